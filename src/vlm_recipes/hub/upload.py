"""What a push uploads: an allow-list of an output folder's files.

The adapter (or full model) weights as safetensors, its config, the processor, the recipe as run, the training log, the
evaluation results, the data report, the training plot and the model card; and from `sft_adapter/` (DPO with
`reference: sft_merged`: the SFT adapter the DPO adapter applies on top of) its weights and config. Checkpoints,
optimizer and scheduler states, pickles and predictions stay local.

The run's own text files (recipe, logs, results, card, adapter config) are uploaded with every local absolute path
replaced by its last part (`/home/me/data/charts` -> `charts`): where the user keeps things is nobody's business, and the
path means nothing on another machine. The files in the folder are left as they are.
"""

import re
from fnmatch import fnmatch
from pathlib import Path

from vlm_recipes.run_folder import (
    ADAPTER_CONFIG,
    CARD_FILE,
    DATA_REPORT_FILE,
    EVAL_RESULTS_FILE,
    PLOT_FILE,
    RECIPE_FILE,
    RUN_INFO_FILE,
    SFT_ADAPTER_COPY,
    TRAINING_LOG,
)


PUSHED_PATTERNS = (
    "*.safetensors",  # adapter_model.safetensors, or a full model's shards
    "model.safetensors.index.json",
    "adapter_config.json",
    "config.json",
    "generation_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    RECIPE_FILE,
    TRAINING_LOG,
    EVAL_RESULTS_FILE,
    DATA_REPORT_FILE,
    PLOT_FILE,
    CARD_FILE,
    RUN_INFO_FILE,
)
# Pushed files that the package or peft write and that may hold local paths (a local base model, dataset or output
# folder): uploaded with the paths reduced to their last part. Tokenizer and model files are uploaded byte for byte.
PATH_SCRUBBED_FILES = (
    RECIPE_FILE,
    TRAINING_LOG,
    EVAL_RESULTS_FILE,
    DATA_REPORT_FILE,
    RUN_INFO_FILE,
    CARD_FILE,
    ADAPTER_CONFIG,
)

# A local path with at least one folder, not inside a URL: absolute (or from the home folder), or relative from a
# folder that starts with a dot (`./data/x`, `../models/y`, `.cache/tiny/qwen2_5_vl`), which no Hub id does. Other
# relative paths (`outputs/run`) cannot be told from a Hub id (`org/model`) or a logged key (`rewards/chosen`).
LOCAL_PATH = re.compile(r"(?<![\w.:/~@+-])(?:~?/|\.\.?/|\.[\w@+-]+/)(?:[\w.@+-]+/)*[\w.@+-]*")


def without_local_paths(text: str) -> tuple[str, int]:
    """`text` with every local absolute (or dot-led relative) path replaced by its last part, and how many were
    replaced."""
    return LOCAL_PATH.subn(lambda match: match.group(0).rstrip("/").rsplit("/", 1)[-1], text)


# Subfolders pushed with the allow-list of their files: the SFT adapter a `reference: sft_merged` DPO adapter sits on.
PUSHED_SUBFOLDERS = {SFT_ADAPTER_COPY: ("*.safetensors", ADAPTER_CONFIG)}


def files_to_push(output_dir: str | Path) -> tuple[list[str], list[str]]:
    """(files on the allow-list, everything else in the folder), both sorted by name, as paths in the folder: the
    top-level files of `PUSHED_PATTERNS`, and in each of `PUSHED_SUBFOLDERS` the files of its own patterns."""
    output_dir = Path(output_dir)
    pushed, left_out = [], []
    for path in sorted(output_dir.iterdir()):
        if path.is_file() and any(fnmatch(path.name, pattern) for pattern in PUSHED_PATTERNS):
            pushed.append(path.name)
        elif path.is_dir() and not path.is_symlink() and path.name in PUSHED_SUBFOLDERS:
            for inner in sorted(path.iterdir()):
                name = f"{path.name}/{inner.name}"
                if inner.is_file() and any(fnmatch(inner.name, p) for p in PUSHED_SUBFOLDERS[path.name]):
                    pushed.append(name)
                else:
                    left_out.append(name + ("/" if inner.is_dir() else ""))
        else:
            left_out.append(path.name + ("/" if path.is_dir() else ""))
    return pushed, left_out


def upload_contents(output_dir: str | Path) -> tuple[dict[str, bytes | Path], list[str], dict[str, int]]:
    """Exactly what a push uploads: path in the repository -> the bytes (scrubbed text files) or the file to send as it
    is; the folder's other files (left local); and how many local paths each scrubbed file lost."""
    output_dir = Path(output_dir)
    pushed, left_out = files_to_push(output_dir)
    contents: dict[str, bytes | Path] = {}
    scrubbed: dict[str, int] = {}
    for name in pushed:
        path = output_dir / name
        if Path(name).name in PATH_SCRUBBED_FILES:
            text, count = without_local_paths(path.read_text(encoding="utf-8"))
            contents[name] = text.encode("utf-8")
            if count:
                scrubbed[name] = count
        else:
            contents[name] = path
    return contents, left_out, scrubbed
