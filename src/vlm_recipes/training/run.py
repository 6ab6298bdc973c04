"""The steps every training entry point takes around its trainer: output folder and data before any weights load;
train, save and summarise after. Each entry point builds its own trainer in between."""

from typing import Any

from transformers import set_seed

from vlm_recipes.configs import EvaluationArguments
from vlm_recipes.console import print_main
from vlm_recipes.data.checks import check_training_data
from vlm_recipes.data.loading import load_datasets
from vlm_recipes.evaluation.sets import EvalSet, load_eval_set
from vlm_recipes.hub.push import push_output_dir
from vlm_recipes.hub.token import HubTarget
from vlm_recipes.modeling.loading import load_for_training
from vlm_recipes.modeling.setup import ModelSetup, resolve_model_setup
from vlm_recipes.processes import is_main_process, main_process_first, wait_for_everyone
from vlm_recipes.recipe import TrainingRecipe
from vlm_recipes.run_folder import DATA_REPORT_FILE
from vlm_recipes.training.distributed import (
    check_launch,
    describe_launch,
    drop_text_only_rows,
    end_process_group_at_exit,
)
from vlm_recipes.training.guards import resume_checkpoint
from vlm_recipes.training.outputs import prepare_output_dir, resume_requested, save_outputs, summary_lines


def resolve_model(recipe: TrainingRecipe) -> ModelSetup:
    """The model side of the run, worked out once (`modeling.setup`): config -> family row -> tuning plan, checked
    against each other (an unknown strategy, `llm_frozen_layers` above the layer count, a learning rate for a frozen
    part, ...). The first step of every training entry point, before the output folder, the data and any weights."""
    training_args = recipe.training
    return resolve_model_setup(
        recipe.model, recipe.tuning, training_args.learning_rate, set(recipe.settings), training_args.trust_remote_code
    )


def data_processes(training_args: Any) -> int | None:
    """TRL's `dataset_num_proc` (GRPO's config has none: one process)."""
    return getattr(training_args, "dataset_num_proc", None)


def prepare_output_and_data(recipe: TrainingRecipe, processor: Any, task: str) -> tuple[Any, Any]:
    """(train_dataset, eval_dataset): the launch checked, the folder checked, the data formatted for `task`, every row
    checked with the model's `processor` (images, text, placeholders, length; `data.checks`) and the report published.
    A missing column, or too many bad rows, stops the run here, before any weights load."""
    data_args, run_args, training_args = recipe.data, recipe.run, recipe.training
    launch = describe_launch(training_args)
    check_launch(launch)
    end_process_group_at_exit()
    folder_settings = {
        "overwrite": run_args.overwrite_output_dir,
        "resume": resume_requested(training_args.resume_from_checkpoint),
    }
    # Every process checks the folder before the main process changes it (deletes it, writes the data report), so that
    # none of them finds the main process's new files and refuses the folder as one that already holds a run.
    prepare_output_dir(training_args.output_dir, **folder_settings, is_main_process=False)
    wait_for_everyone()
    output_dir = prepare_output_dir(training_args.output_dir, **folder_settings, is_main_process=is_main_process())
    # Loading, formatting and checking run on each machine's main process first; the others then reuse the datasets
    # cache it wrote. Checks that stop the run stop every process with the same message.
    max_length, reserved_tokens = recipe.length_limit()
    num_proc = data_processes(training_args)
    with main_process_first():
        train_dataset, eval_dataset, data_report = load_datasets(
            data_args,
            seed=training_args.seed,
            need_eval=training_args.eval_strategy != "no",
            task=task,
            num_proc=num_proc,
        )
        # With the processor alone (no weights): images decoded and made RGB at a size it takes, true token lengths.
        train_dataset, eval_dataset = check_training_data(
            train_dataset,
            eval_dataset,
            data_report,
            processor,
            recipe.reliability,
            max_length,
            num_proc,
            reserved_tokens=reserved_tokens,
        )
        train_dataset = drop_text_only_rows(train_dataset, "train", data_report, launch)
        eval_dataset = drop_text_only_rows(eval_dataset, "eval", data_report, launch)
        data_report.publish(output_dir / DATA_REPORT_FILE if is_main_process() else None, data_args.max_bad_fraction)
    # The adapter's initial weights are drawn before the Trainer seeds anything: seed here, so that they follow the
    # recipe's `seed` whatever the launch (one process or many) consumed from the random generators before.
    set_seed(training_args.seed)
    return train_dataset, eval_dataset


def prepare_eval_sets(
    recipe: TrainingRecipe,
    evaluation: EvaluationArguments,
    processor: Any,
    eval_sets: list[EvalSet],
    eval_dataset: Any,
) -> list[tuple[EvalSet, Any]]:
    """Each evaluation set with the rows evaluation during training generates on, before any weights load: the
    recipe's own split as `prepare_output_and_data` checked it; other sets loaded (only the rows generation uses),
    formatted and checked the same way here, with the run's `processor`. Too many bad rows in a set stop the run, as
    in the training data. Nothing when the run does not evaluate by generation."""
    training_args = recipe.training
    if training_args.eval_strategy == "no" or not evaluation.eval_generation:
        return []
    prepared = []
    for eval_set in eval_sets:
        if eval_set.own_split:
            prepared.append((eval_set, eval_dataset))
            continue
        with main_process_first():
            rows, report = load_eval_set(
                eval_set,
                seed=training_args.seed,
                num_proc=data_processes(training_args),
                limit=eval_set.max_samples or evaluation.eval_generation_rows,
            )
            _, rows = check_training_data(
                None,
                rows,
                report,
                processor,
                recipe.reliability,
                recipe.length_limit()[0],
                data_processes(training_args),
            )
        if report.rejected:
            print_main(
                f"Evaluation set '{eval_set.name}': {report.rejected} row(s) rejected and skipped", report.table()
            )
        report.stop_if_too_many_rejected(recipe.data.max_bad_fraction)
        prepared.append((eval_set, rows))
    return prepared


def load_training_model(recipe: TrainingRecipe, setup: ModelSetup, **start: Any) -> Any:
    """`modeling.loading.load_for_training` for this launch (4-bit weights stored to shard under ZeRO-3/FSDP).
    `start`: DPO's `start_adapter` and `merge_start_adapter`."""
    return load_for_training(setup, shard_parameters=describe_launch(recipe.training).shards_parameters, **start)


def train_and_save(
    trainer: Any, recipe: TrainingRecipe, summary_keys: tuple[str, ...] = (), hub_target: HubTarget | None = None
) -> Any:
    """Train (resuming from the last complete checkpoint when the recipe says so), save the
    outputs, print where they are and how the metrics moved, and push the output folder once, from the main process,
    when `hub_target` (from `prepare_training_push`) is set."""
    output_dir = recipe.training.output_dir
    trainer.train(
        resume_from_checkpoint=resume_checkpoint(output_dir, resume_requested(recipe.training.resume_from_checkpoint))
    )
    save_outputs(trainer, recipe, output_dir)
    print_main(*summary_lines(trainer.state.log_history, output_dir, keys=summary_keys))
    if hub_target is not None and trainer.is_world_process_zero():
        push_output_dir(output_dir, hub_target)
    return trainer
