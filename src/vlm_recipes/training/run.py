"""The steps every training entry point takes around its trainer: output folder and data before any weights load;
train, save and summarise after. Each entry point builds its own trainer in between."""

import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, set_seed

from vlm_recipes.cli import command_of_module
from vlm_recipes.configs import EvaluationArguments
from vlm_recipes.console import print_main, print_summary
from vlm_recipes.data.augmentation import parse_augmentation
from vlm_recipes.data.checks import check_policy, check_training_data
from vlm_recipes.data.lengths import TokenCounter
from vlm_recipes.data.loading import data_folder, load_datasets, mixture_sources, source_folder
from vlm_recipes.data.streaming import StreamReport, check_streaming_settings, checked_stream, stream_datasets, streams
from vlm_recipes.errors import RecipeError
from vlm_recipes.evaluation.sets import EvalSet, load_eval_set
from vlm_recipes.hub.push import push_output_dir
from vlm_recipes.hub.token import HubTarget
from vlm_recipes.modeling.loading import load_for_training
from vlm_recipes.modeling.setup import ModelSetup, resolve_model_setup
from vlm_recipes.processes import is_main_process, main_process_first, wait_for_everyone
from vlm_recipes.recipe import TrainingRecipe
from vlm_recipes.run_folder import DATA_REPORT_FILE
from vlm_recipes.training.distributed import (
    TEXT_ONLY_REASON,
    check_launch,
    describe_launch,
    drop_text_only_rows,
    end_process_group_at_exit,
)
from vlm_recipes.training.guards import ReachedMaxSteps, check_final_weights, resume_checkpoint
from vlm_recipes.training.log_lines import use_log_lines
from vlm_recipes.training.output_folder import plan_output_dir
from vlm_recipes.training.outputs import next_commands, resume_requested, save_outputs, summary_lines
from vlm_recipes.training.speed import groups_by_length


# `report_to` loggers that need a package the base install lacks: (transformers' availability check, the package, the
# extra of this package that installs it, or None).
LOGGER_PACKAGES = {
    "tensorboard": ("is_tensorboard_available", "tensorboard", "tensorboard"),
    "wandb": ("is_wandb_available", "wandb", "wandb"),
    "trackio": ("is_trackio_available", "trackio", None),
    "mlflow": ("is_mlflow_available", "mlflow", None),
    "comet_ml": ("is_comet_available", "comet_ml", None),
    "clearml": ("is_clearml_available", "clearml", None),
    "neptune": ("is_neptune_available", "neptune", None),
    "swanlab": ("is_swanlab_available", "swanlab", None),
    "dvclive": ("is_dvclive_available", "dvclive", None),
    "codecarbon": ("is_codecarbon_available", "codecarbon", None),
}


def check_loggers(training_args: Any) -> None:
    """Every logger `report_to` names is installed, checked at start: the Trainer would find out only after the data
    checks and the model load."""
    import transformers.integrations as integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    for name in training_args.report_to or []:
        if name not in INTEGRATION_TO_CALLBACK:
            raise RecipeError(
                f"report_to: '{name}' is not a logger transformers knows ({', '.join(INTEGRATION_TO_CALLBACK)}, or "
                "none). For several, give a YAML list in the recipe (report_to: [trackio, wandb])."
            )
        if name not in LOGGER_PACKAGES:
            continue  # installed with transformers' own checks at start (azure_ml, kubeflow, ...)
        available, package, extra = LOGGER_PACKAGES[name]
        if not getattr(integrations, available)():
            how = (
                f"pip install 'vlm-recipes[{extra}]' (or pip install {package})" if extra else f"pip install {package}"
            )
            raise RecipeError(
                f"report_to: {name} needs the {package} package, which is not installed: {how}; or set "
                "`report_to: none`."
            )


def check_training_length(training_args: Any) -> None:
    """A run that would not train, or would train for a length it does not say: refused before any work. transformers
    takes any `max_steps` <= 0 as "train by epochs", so -5 ran for `num_train_epochs`; 0 steps or 0 epochs saved an
    untrained adapter."""
    steps, epochs = training_args.max_steps, training_args.num_train_epochs
    if steps == 0 or steps < -1:
        raise RecipeError(
            f"max_steps: {steps} is not a length of training: give a positive number of steps, or -1 (the default) "
            "to train for `num_train_epochs`."
        )
    if steps == -1 and not epochs > 0:
        raise RecipeError(
            f"num_train_epochs: {epochs} would train nothing (max_steps is -1, so the epochs set the length): give a "
            "positive number of epochs, or a positive `max_steps`."
        )


DEFAULT_PROJECT = "huggingface"  # TrainingArguments.project's default: every run in one trackio project


def name_tracking_project(recipe: TrainingRecipe) -> None:
    """A run logs to a project named after its recipe file (recipes/chartqa.yaml -> chartqa) unless the recipe or the
    command line sets `project`: trackio reads `TrainingArguments.project`, wandb the WANDB_PROJECT variable (set
    here only where the user has not set it)."""
    args = recipe.training
    if "project" not in recipe.settings and recipe.source and args.project == DEFAULT_PROJECT:
        args.project = Path(recipe.source).stem
    if "wandb" in (args.report_to or []):
        os.environ.setdefault("WANDB_PROJECT", args.project)


def check_run_settings(recipe: TrainingRecipe) -> None:
    """What the Trainer would only find out late (a logger not installed) or silently misread (a training length that
    trains nothing): checked first, before the model config, the data and any weights."""
    check_loggers(recipe.training)
    name_tracking_project(recipe)
    check_training_length(recipe.training)
    check_streaming_settings(recipe.data, recipe.training)
    parse_augmentation(recipe.data.augmentation)  # a flip or a wrong strength refused before any data loads


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


def prepare_output_and_data(
    recipe: TrainingRecipe, processor: Any, task: str, reads: dict[str, Any] | None = None
) -> tuple[Any, Any]:
    """(train_dataset, eval_dataset): the launch checked, the folder checked, the data formatted for `task`, every row
    checked with the model's `processor` (images, text, placeholders, length; `data.checks`) and the report published;
    then the output folder made ready (an earlier run moved aside, `training.output_folder`). A missing column, or too
    many bad rows, stops the run here, before any weights load or anything in the folder changes. `reads`: folders the
    entry point reads besides the recipe's data, model and recipe file (what -> path), never an output folder."""
    data_args, run_args, training_args = recipe.data, recipe.run, recipe.training
    launch = describe_launch(training_args)
    check_launch(launch)
    end_process_group_at_exit()
    # Decided now, done once the data checks pass: an earlier run is moved aside only when this one can start. Every
    # process decides before the main process changes the folder (moves it, writes the data report), so that none of
    # them finds the main process's new files and refuses the folder as one that already holds a run.
    folder = plan_output_dir(
        training_args.output_dir,
        overwrite=run_args.overwrite_output_dir,
        resume=resume_requested(training_args.resume_from_checkpoint),
        protected=protected_folders(recipe, reads),
    )
    wait_for_everyone()
    # Loading, formatting and checking run on each machine's main process first; the others then reuse the datasets
    # cache it wrote. Checks that stop the run stop every process with the same message.
    max_length, reserved_tokens = recipe.length_limit()
    num_proc = data_processes(training_args)
    if streams(data_args):
        return _prepare_stream(recipe, processor, task, folder, launch)
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
        data_report.count_trained_rows(train_dataset, eval_dataset)  # a mixture's rows per source, as trained
        if data_report.stops(data_args.max_bad_fraction) and folder.holds_earlier_run:
            # The earlier run stays as it was: the report goes on screen only.
            data_report.publish(None, data_args.max_bad_fraction)
        output_dir = folder.apply(is_main_process())
        data_report.publish(output_dir / DATA_REPORT_FILE if is_main_process() else None, data_args.max_bad_fraction)
    # The adapter's initial weights are drawn before the Trainer seeds anything: seed here, so that they follow the
    # recipe's `seed` whatever the launch (one process or many) consumed from the random generators before.
    set_seed(training_args.seed)
    return train_dataset, eval_dataset


STREAMED_TASKS = ("sft", "preference")  # GRPO's and KTO's steps after the checks need the rows in full


def _prepare_stream(recipe: TrainingRecipe, processor: Any, task: str, folder: Any, launch: Any) -> tuple[Any, Any]:
    """`prepare_output_and_data` for streamed training rows (`data.streaming`): the evaluation rows are read and checked
    now; the training rows are checked as the trainer reads them, into a report written at each save and at the end."""
    data_args, training_args = recipe.data, recipe.training
    if task not in STREAMED_TASKS:
        raise RecipeError(
            f"streaming: {recipe.entry_point or task} reads its rows in full (SFT and DPO stream); set "
            "`streaming: false`, or train on a sample of the data (`max_train_samples`)."
        )
    max_length, reserved_tokens = recipe.length_limit()
    num_proc = data_processes(training_args)
    with main_process_first():
        mixed, eval_dataset, running = stream_datasets(
            data_args, seed=training_args.seed, need_eval=training_args.eval_strategy != "no", task=task,
            num_proc=num_proc,
        )  # fmt: skip
        report = running.report
        _, eval_dataset = check_training_data(
            None, eval_dataset, report, processor, recipe.reliability, max_length, num_proc, reserved_tokens
        )
        eval_dataset = drop_text_only_rows(eval_dataset, "eval", report, launch)
        output_dir = folder.apply(is_main_process())
        if is_main_process():
            running.path = output_dir / DATA_REPORT_FILE
        report.publish(running.path, data_args.max_bad_fraction)
    checks = recipe.reliability.check_data
    world = max(1, getattr(training_args, "world_size", 1))
    train_dataset = checked_stream(
        mixed,
        running,
        TokenCounter(processor) if checks else None,
        check_policy(processor, recipe.reliability, max_length, reserved_tokens=reserved_tokens) if checks else None,
        seed=training_args.seed,
        buffer_size=data_args.shuffle_buffer_size,
        global_batch=training_args.per_device_train_batch_size * world if groups_by_length(training_args) else None,
        skip_text_only=TEXT_ONLY_REASON if launch.shards_parameters else None,
    )
    set_seed(training_args.seed)
    return train_dataset, eval_dataset


class StreamReportWriter(TrainerCallback):
    """Writes a stream's running data report (`data.streaming.StreamReport`) at each save and at the end of training."""

    def __init__(self, running: StreamReport):
        self.running = running

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.running.write()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.running.write()


def protected_folders(recipe: TrainingRecipe, reads: dict[str, Any] | None = None) -> dict[str, Any]:
    """Folders a training run reads, which its output folder must never be nor contain (`training.output_folder`):
    the dataset's, the images', the recipe's and the model's, and `reads` (what -> path) of the entry point."""
    data_args, model_args = recipe.data, recipe.model
    model = Path(str(model_args.model_name_or_path or "")).expanduser()
    mixture = {
        f"the folder of the dataset '{source.name}'": source_folder(source.entry.source)
        for source in (mixture_sources(data_args) if data_args.datasets else [])
    }
    return {
        "the dataset's folder": data_folder(data_args),
        **mixture,
        "the images' folder (image_dir)": data_args.image_dir,
        "the recipe's folder": Path(recipe.source).parent if recipe.source else None,
        "the model's folder": model if model_args.model_name_or_path and model.is_dir() else None,
        **(reads or {}),
    }


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
    running = getattr(trainer.train_dataset, "stream_report", None)
    if running is not None:
        trainer.add_callback(StreamReportWriter(running))
    checkpoint = resume_checkpoint(output_dir, resume_requested(recipe.training.resume_from_checkpoint))
    use_log_lines(trainer)
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except ReachedMaxSteps as reached:
        # Killed after its last checkpoint, before the final save: the Trainer has loaded that checkpoint (weights and
        # state); it is the result, so it is saved as such without training a step past max_steps.
        print_main(f"{reached}: saving the final outputs from it, without training further.")
        trainer.control = trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)
    check_final_weights(trainer.model, trainer.state.global_step, output_dir)
    save_outputs(trainer, recipe, output_dir)
    if hub_target is not None and trainer.is_world_process_zero():
        push_output_dir(output_dir, hub_target)
    print_summary(
        command_of_module(recipe.entry_point or "") or "training",
        summary_lines(trainer.state.log_history, output_dir, keys=summary_keys),
        next_commands(recipe, output_dir, pushed=hub_target is not None),
    )
    return trainer
