"""The steps every training entry point takes around its trainer: output folder and data before any weights load;
train, save and summarise after. Each entry point builds its own trainer in between."""

from pathlib import Path
from typing import Any

from accelerate import PartialState

from vlm_recipes.console import print_main
from vlm_recipes.data.loading import load_datasets
from vlm_recipes.hub import HubTarget, push_output_dir
from vlm_recipes.recipe import Recipe
from vlm_recipes.training.outputs import prepare_output_dir, resume_requested, save_outputs, summary_lines


def prepare_output_and_data(recipe: Recipe, task: str) -> tuple[Path, Any, Any]:
    """(output_dir, train_dataset, eval_dataset): the folder checked, the data formatted for `task` and its report
    published. A missing column, or too many bad rows, stops the run here, before any weights load."""
    data_args, run_args, training_args = recipe.data, recipe.run, recipe.training
    is_main_process = PartialState().is_main_process
    output_dir = prepare_output_dir(
        training_args.output_dir,
        overwrite=run_args.overwrite_output_dir,
        resume=resume_requested(training_args.resume_from_checkpoint),
        is_main_process=is_main_process,
    )
    train_dataset, eval_dataset, data_report = load_datasets(
        data_args,
        seed=training_args.seed,
        need_eval=training_args.eval_strategy != "no",
        task=task,
        num_proc=training_args.dataset_num_proc,
    )
    data_report.publish(output_dir, data_args.max_bad_fraction, is_main_process)
    return output_dir, train_dataset, eval_dataset


def train_and_save(
    trainer: Any, recipe: Recipe, summary_keys: tuple[str, ...] = (), hub_target: HubTarget | None = None
) -> Any:
    """Train (resuming when the recipe says so), save the outputs, print where they are and how the metrics moved,
    and push the output folder once, from the main process, when `hub_target` (from `prepare_training_push`) is set."""
    trainer.train(resume_from_checkpoint=resume_requested(recipe.training.resume_from_checkpoint))
    output_dir = recipe.training.output_dir
    save_outputs(trainer, recipe, output_dir)
    print_main(*summary_lines(trainer.state.log_history, output_dir, keys=summary_keys))
    if hub_target is not None and trainer.is_world_process_zero():
        push_output_dir(output_dir, hub_target)
    return trainer
