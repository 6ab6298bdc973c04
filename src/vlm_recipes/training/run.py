"""The steps every training entry point takes around its trainer: output folder and data before any weights load;
train, save and summarise after. Each entry point builds its own trainer in between."""

from contextlib import nullcontext
from pathlib import Path
from typing import Any

from accelerate import PartialState
from transformers import set_seed

from vlm_recipes.configs import ReliabilityArguments
from vlm_recipes.console import print_main
from vlm_recipes.data.checks import check_training_data
from vlm_recipes.data.loading import load_datasets
from vlm_recipes.evaluation.sets import EvalSet, load_eval_set
from vlm_recipes.hub import HubTarget, push_output_dir
from vlm_recipes.modeling.families import get_family
from vlm_recipes.modeling.loading import TrainingModel, load_config, load_for_training, load_processor
from vlm_recipes.modeling.strategies import TuningPlan, resolve_strategy
from vlm_recipes.recipe import Recipe
from vlm_recipes.training.distributed import (
    check_launch,
    describe_launch,
    drop_text_only_rows,
    end_process_group_at_exit,
    main_process_first,
    wait_for_everyone,
)
from vlm_recipes.training.guards import install_fault_guards, resume_checkpoint
from vlm_recipes.training.outputs import prepare_output_dir, resume_requested, save_outputs, summary_lines


def reliability(recipe: Recipe) -> ReliabilityArguments:
    """The recipe's data-check and fault-guard settings (the defaults for an entry point without that part)."""
    return recipe.parts.get("reliability") or ReliabilityArguments()


def check_tuning_plan(recipe: Recipe) -> TuningPlan:
    """The recipe's tuning strategy checked against the model's config alone (an unknown strategy, `llm_frozen_layers`
    above the layer count, a learning rate for a frozen part, ...): the first step of every training entry point,
    before the output folder, the data and any weights. Sets `use_peft`/`load_in_4bit` to match the strategy."""
    model_args, training_args = recipe.model, recipe.training
    config = load_config(model_args, training_args.trust_remote_code)
    return resolve_strategy(
        recipe.tuning, model_args, config, get_family(config), training_args.learning_rate, set(recipe.settings)
    )


def prepare_output_and_data(recipe: Recipe, task: str) -> tuple[Path, Any, Any]:
    """(output_dir, train_dataset, eval_dataset): the launch checked, the folder checked, the data formatted for `task`,
    every row checked (images, text, placeholders, length; `data.checks`) and the report published. A missing column,
    or too many bad rows, stops the run here, before any weights load."""
    data_args, run_args, training_args = recipe.data, recipe.run, recipe.training
    launch = describe_launch(training_args)
    check_launch(launch)
    end_process_group_at_exit()
    is_main_process = PartialState().is_main_process
    folder_settings = {
        "overwrite": run_args.overwrite_output_dir,
        "resume": resume_requested(training_args.resume_from_checkpoint),
    }
    # Every process checks the folder before the main process changes it (deletes it, writes the data report), so that
    # none of them finds the main process's new files and refuses the folder as one that already holds a run.
    prepare_output_dir(training_args.output_dir, **folder_settings, is_main_process=False)
    wait_for_everyone()
    output_dir = prepare_output_dir(training_args.output_dir, **folder_settings, is_main_process=is_main_process)
    # Loading, formatting and checking run on each machine's main process first; the others then reuse the datasets
    # cache it wrote. Checks that stop the run stop every process with the same message.
    with main_process_first():
        train_dataset, eval_dataset, data_report = load_datasets(
            data_args,
            seed=training_args.seed,
            need_eval=training_args.eval_strategy != "no",
            task=task,
            num_proc=training_args.dataset_num_proc,
        )
        # With the processor alone (no weights): images decoded and made RGB at a size it takes, true token lengths.
        train_dataset, eval_dataset = check_training_data(
            train_dataset,
            eval_dataset,
            data_report,
            load_processor(recipe.model, training_args.trust_remote_code),
            reliability(recipe),
            training_args.max_length,
            training_args.dataset_num_proc,
            main_process_first=nullcontext,  # already ordered by the enclosing main_process_first
        )
        train_dataset = drop_text_only_rows(train_dataset, "train", data_report, launch)
        eval_dataset = drop_text_only_rows(eval_dataset, "eval", data_report, launch)
        data_report.publish(output_dir, data_args.max_bad_fraction, is_main_process)
    # The adapter's initial weights are drawn before the Trainer seeds anything: seed here, so that they follow the
    # recipe's `seed` whatever the launch (one process or many) consumed from the random generators before.
    set_seed(training_args.seed)
    return output_dir, train_dataset, eval_dataset


def prepare_eval_sets(recipe: Recipe, eval_sets: list[EvalSet], eval_dataset: Any) -> list[tuple[EvalSet, Any]]:
    """Each evaluation set with the rows evaluation during training generates on, before any weights load: the
    recipe's own split as `prepare_output_and_data` checked it; other sets loaded (only the rows generation uses),
    formatted and checked the same way here. Too many bad rows in a set stop the run, as in the training data.
    Nothing when the run does not evaluate by generation."""
    training_args, evaluation = recipe.training, recipe.evaluation
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
                num_proc=training_args.dataset_num_proc,
                limit=eval_set.max_samples or evaluation.eval_max_samples,
            )
            _, rows = check_training_data(
                None,
                rows,
                report,
                load_processor(recipe.model, training_args.trust_remote_code),
                reliability(recipe),
                training_args.max_length,
                training_args.dataset_num_proc,
                main_process_first=nullcontext,
            )
        if report.rejected:
            print_main(
                f"Evaluation set '{eval_set.name}': {report.rejected} row(s) rejected and skipped", report.table()
            )
        report.stop_if_too_many_rejected(recipe.data.max_bad_fraction)
        prepared.append((eval_set, rows))
    return prepared


def load_training_model(recipe: Recipe, **start: Any) -> TrainingModel:
    """`modeling.loading.load_for_training` with the recipe's fields, for this launch (4-bit weights stored to shard
    under ZeRO-3/FSDP). `start`: DPO's `start_adapter` and `merge_start_adapter`."""
    training_args = recipe.training
    return load_for_training(
        recipe.model,
        recipe.tuning,
        training_args.learning_rate,
        set(recipe.settings),
        training_args.trust_remote_code,
        shard_parameters=describe_launch(training_args).shards_parameters,
        **start,
    )


def train_and_save(
    trainer: Any, recipe: Recipe, summary_keys: tuple[str, ...] = (), hub_target: HubTarget | None = None
) -> Any:
    """Train (guarded against faults; resuming from the last complete checkpoint when the recipe says so), save the
    outputs, print where they are and how the metrics moved, and push the output folder once, from the main process,
    when `hub_target` (from `prepare_training_push`) is set."""
    output_dir = recipe.training.output_dir
    install_fault_guards(trainer, reliability(recipe))  # checkpoint completion markers, NaN/inf stop
    trainer.train(
        resume_from_checkpoint=resume_checkpoint(output_dir, resume_requested(recipe.training.resume_from_checkpoint))
    )
    save_outputs(trainer, recipe, output_dir)
    print_main(*summary_lines(trainer.state.log_history, output_dir, keys=summary_keys))
    if hub_target is not None and trainer.is_world_process_zero():
        push_output_dir(output_dir, hub_target)
    return trainer
