"""A run's output folder: every name in it, and the reading of a saved run. Imports nothing from modeling or training.

    output_dir/
      adapter_model.safetensors, adapter_config.json   the trained adapter (a full fine-tune: the model's weights)
      processor and tokenizer files                    the processor the run trained with
      recipe.yaml                                      the recipe as run (`vlm_recipes.recipe.save_recipe`)
      training_log.json                                the Trainer's log history
      data_report.json                                 rows rejected and fixed before training (`data.report`)
      training_plot.png                                losses and evaluation metrics by step (`training.plots`)
      eval_results.json, predictions_<set>_<model>.jsonl   `python -m vlm_recipes.evaluate`
      README.md                                        the model card (`hub.card`)
      sft_adapter/                                     DPO with `reference: sft_merged`: the SFT adapter it sits on
      checkpoint-N/ (with checkpoint_complete.json)    the Trainer's checkpoints, marked complete (`training.guards`), or
                    (with checkpoint_nonfinite.json)   marked as holding NaN/inf weights (or the ones that gave a NaN)
      incomplete-checkpoint-N/                         a checkpoint interrupted during its save (or non-finite), moved aside
      training_args.bin, runs/                         the Trainer's pickled arguments, its TensorBoard logs (not pushed)

    <output_dir>.previous-<timestamp>/                 an earlier run moved aside by `overwrite_output_dir`
                                                       (`training.output_folder`)

Every module that writes or reads one of these takes its name from here.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_recipes.compat import TRL_REFERENCE_ADAPTER
from vlm_recipes.errors import RecipeError
from vlm_recipes.recipe import entry_point_of


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
RECIPE_FILE = "recipe.yaml"
TRAINING_LOG = "training_log.json"
TRAINING_ARGS_PICKLE = "training_args.bin"  # the Trainer's pickled arguments: kept in checkpoints, not in the folder
DATA_REPORT_FILE = "data_report.json"
PLOT_FILE = "training_plot.png"
EVAL_RESULTS_FILE = "eval_results.json"
CARD_FILE = "README.md"
# A DPO run with `reference: sft_merged` trains its adapter on base + the SFT adapter merged in, and keeps a copy of that
# SFT adapter in this subfolder: loading the DPO adapter means merging the SFT one first.
SFT_ADAPTER_COPY = "sft_adapter"
# Checkpoints: transformers names them `checkpoint-N`; a complete one holds this marker (`training.guards`), one whose
# trained weights are NaN or infinite (or gave a NaN loss at the next step) the other one, which outranks it.
CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR (tests/test_output_folder.py checks it)
COMPLETE_MARKER = "checkpoint_complete.json"
NONFINITE_MARKER = "checkpoint_nonfinite.json"
INCOMPLETE_PREFIX = "incomplete-"
TRAINER_STATE = "trainer_state.json"
TENSORBOARD_DIR = "runs"  # TrainingArguments.logging_dir's default

# What a run writes into output_dir before training starts: the data report and, for DPO with `reference: sft_merged`,
# its copy of the SFT adapter. A folder holding nothing else is a run that stopped before training (too many bad rows,
# a recipe error), not a previous run's work.
PRE_TRAINING_FILES = frozenset({DATA_REPORT_FILE})
PRE_TRAINING_FOLDERS = {SFT_ADAPTER_COPY: frozenset({ADAPTER_CONFIG, ADAPTER_WEIGHTS})}


def predictions_file(set_name: str, model: str) -> str:
    """The predictions of one evaluated model ("base", "adapter") on one evaluation set."""
    return f"predictions_{set_name}_{model}.jsonl"


# A folder holding one of these (or a checkpoint) is recognisably a run of this package (`training.output_folder`).
RUN_MARKERS = (RECIPE_FILE, TRAINING_LOG, DATA_REPORT_FILE)
# Top-level names (glob patterns) a run writes that a push leaves local; with the push's allow-list
# (`hub.upload.PUSHED_PATTERNS`) they are everything a run of this package writes into its folder.
LOCAL_RUN_PATTERNS = (
    f"{CHECKPOINT_PREFIX}-*",
    f"{INCOMPLETE_PREFIX}{CHECKPOINT_PREFIX}-*",
    TRL_REFERENCE_ADAPTER,  # DPO's frozen reference copy of an adapter, which peft saves in a subfolder of its name
    TRAINING_ARGS_PICKLE,
    TENSORBOARD_DIR,
    predictions_file("*", "*"),
)
# An earlier run moved aside by `overwrite_output_dir`: `<output_dir>.previous-<timestamp>`.
PREVIOUS_RUN_SUFFIX = ".previous-"


# ---------------------------------------------------------------------------------------------------------------------
# Reading a saved run


def read_saved_recipe(folder: str | Path) -> dict[str, Any]:
    """The fields of the `recipe.yaml` saved with a run's outputs ({} when the folder has none)."""
    import yaml

    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        return {}
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"{path} is not valid YAML: {error}") from None
    return content if isinstance(content, dict) else {}


def read_adapter_config(adapter: str | Path) -> dict[str, Any]:
    """The adapter's `adapter_config.json`; a clear error when the folder holds no adapter."""
    path = Path(adapter) / ADAPTER_CONFIG
    if not path.is_file():
        what = "does not exist" if not Path(adapter).exists() else f"holds no LoRA adapter (no {ADAPTER_CONFIG})"
        raise RecipeError(f"Adapter folder {adapter} {what}. Pass the `output_dir` of a LoRA/QLoRA training run.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RecipeError(f"{path} is not valid JSON: {error}") from None


def sft_adapter_under(adapter: str | Path | None) -> Path | None:
    """The SFT adapter an adapter folder applies on top of (`<adapter>/sft_adapter/`, written by a DPO run with
    `reference: sft_merged`), or None for an adapter that applies on the base alone."""
    if adapter is None:
        return None
    path = Path(adapter) / SFT_ADAPTER_COPY
    return path if (path / ADAPTER_CONFIG).is_file() else None


def loss_points(log_history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, training loss) of every logged training loss, in order."""
    return [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except json.JSONDecodeError:
        return None


@dataclass
class SavedRun:
    """What a finished run's output folder says about the run (for its model card and for pushing it)."""

    output_dir: Path
    recipe: dict[str, Any]
    recipe_text: str
    base_model: str | None
    is_adapter: bool
    sft_adapter: bool  # the adapter applies on top of base + the SFT adapter in `sft_adapter/` (DPO, sft_merged)
    log_history: list[dict[str, Any]]
    eval_results: dict[str, Any] | None
    has_plot: bool
    entry_point: str

    @classmethod
    def read(cls, output_dir: str | Path) -> "SavedRun":
        output_dir = Path(output_dir)
        recipe = read_saved_recipe(output_dir)
        adapter_config = _read_json(output_dir / ADAPTER_CONFIG)
        base_model = (adapter_config or {}).get("base_model_name_or_path") or recipe.get("model_name_or_path")
        recipe_path = output_dir / RECIPE_FILE
        recipe_text = recipe_path.read_text(encoding="utf-8") if recipe_path.is_file() else ""
        return cls(
            output_dir=output_dir,
            recipe=recipe,
            recipe_text=recipe_text,
            base_model=base_model,
            is_adapter=adapter_config is not None,
            sft_adapter=adapter_config is not None and (output_dir / SFT_ADAPTER_COPY / ADAPTER_CONFIG).is_file(),
            log_history=_read_json(output_dir / TRAINING_LOG) or [],
            eval_results=_read_json(output_dir / EVAL_RESULTS_FILE),
            has_plot=(output_dir / PLOT_FILE).is_file(),
            entry_point=entry_point_of(recipe_text),
        )
