"""The package's own recipe fields. TRL's `SFTConfig`/`DPOConfig` and `ModelConfig` carry everything else.

Every field carries `help` text, so `python -m vlm_recipes.sft --help` documents the whole recipe.
"""

from dataclasses import dataclass, field

from trl import ModelConfig


# Fields that were renamed: old name -> (new name, what it is). A recipe with the old name gets one message naming the
# new one (`recipe.parse_recipe`).
RENAMED_FIELDS = {
    "eval_max_samples": (
        "eval_generation_rows",
        "the evaluation rows answers are generated for during training; `max_eval_samples` still trims the split",
    ),
}


@dataclass
class DataArguments:
    """Where the data comes from and how rows become chat messages."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A Hub dataset id (HuggingFaceM4/ChartQA), a local dataset folder (parquet/arrow files or a "
            "`save_to_disk` folder), or a JSONL file of conversations with image paths."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name (Hub datasets)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(
        default="test",
        metadata={"help": "Split to evaluate on; `none` for no evaluation split. Missing splits are an error."},
    )
    eval_split_size: float | None = field(
        default=None,
        metadata={
            "help": "Hold out this fraction (0-1) or number of rows (>=1) of the train split for evaluation, for "
            "datasets that ship no test split (such as a single JSONL file)."
        },
    )
    train_split_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Train on this fraction (0-1) of the train split and evaluate on the rest: a seeded held-out split "
            "(the same rows every run, recorded in data_report.json) for data with no test split. The same as "
            "`eval_split_size: 1 - ratio`; give one of the two. In a mixture, each source without a test split "
            "(`splits.test` in its registry entry) is split this way."
        },
    )
    dataset_registry: str | None = field(
        default=None,
        metadata={
            "help": "A YAML registry of named datasets (source, formatter or column mapping, image root, splits, "
            "weight; see docs/your-data.md). Its entries join the built-in ones (ChartQA, RLAIF-V and each task's "
            "data), replacing any of the same name. `datasets` names them."
        },
    )
    datasets: list[str] | None = field(
        default=None,
        metadata={
            "help": "Train on a mixture instead of `dataset_name`: a YAML list of registered names or mappings with "
            "`name` and optionally `weight` (sampling probability relative to the others), `max_samples` (a cap; "
            "alone, the source joins whole) and any registry field for an inline source (on the command line, JSON "
            "objects). Seeded interleaving; rows per source in data_report.json."
        },
    )
    formatter: str = field(
        default="chartqa",
        metadata={
            "help": "How a dataset row becomes chat messages: one of the names in `vlm_recipes.data.formatters`. "
            "Default: the formatter of the recipe's `task` (chartqa when the recipe names no task)."
        },
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "Optional system message put before every conversation."}
    )
    image_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder that relative image paths in a JSONL dataset are resolved against. Defaults to the "
            "JSONL file's own folder."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training rows (quick runs, debugging)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation rows."})
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read the training rows as a stream (for data larger than memory or disk): each row is formatted "
            "and checked when the trainer reaches it, bad rows are skipped and counted in a running data_report.json "
            "(written at each save and at the end). Needs a positive `max_steps`. A mixture entry may set "
            "`streaming: true` for itself. Evaluation rows are read into memory (docs/your-data.md)."
        },
    )
    shuffle_buffer_size: int = field(
        default=1000,
        metadata={
            "help": "Streaming: rows held at once; each full buffer is shuffled (seeded) and, with length grouping, cut "
            "into batches of similar length."
        },
    )
    augmentation: str | None = field(
        default=None,
        metadata={
            "help": "Augment training images (off by default; evaluation rows never): a mapping of brightness, "
            "contrast, saturation, crop (fractions), jpeg_quality ([low, high]), resolution (a downscale fraction), "
            "probability and seed; on the command line a JSON object. No flips or rotations (they change what a chart "
            "says). See docs/your-data.md; `preflight --show_augmentation grid.png` draws examples."
        },
    )
    max_bad_fraction: float = field(
        default=0.05,
        metadata={
            "help": "Rows that fail the checks are skipped and counted in data_report.json; when more than this "
            "fraction of a split is rejected, the run stops before loading the model. 0 stops on any bad row."
        },
    )


@dataclass
class ModelArguments(ModelConfig):
    """TRL's `ModelConfig` with defaults for vision-language fine-tuning, plus the image processor's size rule."""

    dtype: str | None = field(
        default="bfloat16",
        metadata={
            "help": "Dtype the weights load in (and the 4-bit compute dtype).",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )
    use_bnb_nested_quant: bool = field(
        default=True, metadata={"help": "Double quantization of the 4-bit constants (QLoRA's default)."}
    )
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "LoRA target modules. Default: every attention and MLP projection of the language model, and "
            "nothing in the vision tower (from the model family table)."
        },
    )
    image_min_pixels: int | None = field(
        default=None,
        metadata={"help": "Smallest image area (pixels) the processor resizes up to; default: the processor's own."},
    )
    image_max_pixels: int | None = field(
        default=None,
        metadata={
            "help": "Largest image area (pixels) the processor keeps; larger images are downscaled. Bounds the "
            "image-token count (Qwen-VL: one token per 28x28 pixels). Default: the processor's own."
        },
    )


@dataclass
class RunArguments:
    """How the run treats its output folder."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace an earlier run in `output_dir`: once the new run's recipe, model and data checks pass, it "
            "is moved aside whole to `<output_dir>.previous-<timestamp>` (never deleted). Only a folder that is "
            "recognisably an earlier run of this package, holding nothing else, is replaced. Without it (and without "
            "`resume_from_checkpoint`), a non-empty `output_dir` is refused so nothing is overwritten silently."
        },
    )


@dataclass
class TuningArguments:
    """Which parts of the VLM learn (vision tower, projector, language model), how, and how fast."""

    tuning_strategy: str | None = field(
        default=None,
        metadata={
            "help": "qlora (4-bit LLM + LoRA), lora, lora_llm_full_vit, partial_llm_full_vit, vit_only, projector_only "
            "or full. Default: qlora with `load_in_4bit`, lora with `use_peft`, else full.",
            "choices": [
                "qlora", "lora", "lora_llm_full_vit", "partial_llm_full_vit", "vit_only", "projector_only", "full",
            ],
        },
    )  # fmt: skip
    train_projector: bool = field(
        default=False, metadata={"help": "lora/qlora: also train the projector in full (saved with the adapter)."}
    )
    llm_frozen_layers: int = field(
        default=0,
        metadata={"help": "partial_llm_full_vit: freeze the first N language-model layers (and the embeddings)."},
    )
    vision_lora_r: int | None = field(
        default=None,
        metadata={"help": "lora/qlora: also put LoRA of this rank on the (otherwise frozen) vision tower."},
    )
    learning_rate_llm: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the language model's trained weights (default: learning_rate)."},
    )
    learning_rate_vit: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the vision tower's trained weights (default: learning_rate)."},
    )
    learning_rate_projector: float | None = field(
        default=None, metadata={"help": "Learning rate of the projector (default: learning_rate)."}
    )
    vit_unfreeze_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Staged unfreezing: the vision tower stays unchanged for this fraction of the training steps, "
            "then trains at learning_rate_vit (its learning rate is zero until then)."
        },
    )


@dataclass
class EvaluationArguments:
    """The task the data is (its formatter, prompts, metrics) and answer-level evaluation: greedy generation on
    evaluation sets, scored with the task's metrics.

    `python -m vlm_recipes.evaluate` uses every row of each set (after `max_eval_samples` or the set's `max_samples`);
    during training the same evaluation runs at each of the Trainer's evaluations (`eval_strategy`, `eval_steps`) on
    `eval_generation_rows` rows of each set.
    """

    task: str | None = field(
        default=None,
        metadata={
            "help": "What the data is and how answers are scored: chartqa, docvqa, infovqa, textvqa, vqav2, "
            "multiple_choice or conversation (`vlm_recipes.tasks`). It sets the default `formatter`, the prompt "
            "presets, the metrics and `max_new_tokens`. Default: the task of the recipe's `formatter`."
        },
    )
    prompt_preset: str = field(
        default="recipe",
        metadata={
            "help": "How evaluation questions are asked: `recipe` (the prompt the model trained on, system prompt "
            "included), or a harness's prompt for the task (`lmms_eval`, `vlmevalkit`, ...; see the task) to compare "
            "with published figures. Each evaluation set may name its own."
        },
    )
    eval_datasets: list[str] | None = field(
        default=None,
        metadata={
            "help": "Evaluation sets, each evaluated during training and by `evaluate` and logged as "
            "eval/<name>/<metric>: a YAML list of mappings with `name` and optionally `dataset`, `dataset_config`, "
            "`task`, `formatter`, `split`, `max_samples`, `prompt_preset`, `max_new_tokens` (on the command line, "
            "one JSON object each). Unset fields come from the recipe. Default: one set, named after the task, on "
            "the recipe's evaluation split."
        },
    )
    eval_generation: bool = field(
        default=True,
        metadata={
            "help": "At every evaluation during training, also generate answers for each evaluation set and log its "
            "metrics (eval/<set>/<metric>) to the trainer's loggers (`report_to`). Needs `eval_strategy`."
        },
    )
    eval_generation_rows: int | None = field(
        default=64,
        metadata={
            "help": "Rows of each evaluation set (the first N, the same every time) that generation runs on at each "
            "evaluation during training (a set's own `max_samples` wins); `null` for all."
        },
    )
    max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Longest generated answer, in tokens. Default: the task's (ChartQA 16, DocVQA 128, ...)."},
    )
    eval_generation_batch_size: int | None = field(
        default=None,
        metadata={"help": "Rows per generation batch (left-padded). Default: `per_device_eval_batch_size`."},
    )


@dataclass
class PolicyArguments:
    """DPO, GRPO and KTO: where the trained policy starts (the base model, or an SFT run's adapter) and what the
    reference is."""

    sft_adapter_path: str | None = field(
        default=None,
        metadata={
            "help": "Start from this SFT adapter (the output folder of `vlm_recipes.sft` with LoRA). Without it, "
            "a new LoRA adapter trains on the base model and the reference is the base model (adapter disabled)."
        },
    )
    reference: str | None = field(
        default=None,
        metadata={
            "help": "How the reference (the SFT policy) is formed when starting from `sft_adapter_path`. "
            "`sft_adapter` (default): the SFT adapter keeps training and a frozen copy of it is the reference; exact "
            "with 16-bit and 4-bit bases, costs a second adapter (small). `sft_merged`: the SFT adapter is merged into "
            "the 16-bit base weights (in place), a new LoRA adapter trains on top and the reference is the merged "
            "model with that adapter disabled; the saved DPO adapter then applies on top of base + SFT adapter. "
            "Not with `load_in_4bit` (merging into 4-bit weights rounds them). Neither keeps a second model copy.",
            "choices": ["sft_adapter", "sft_merged"],
        },
    )


@dataclass
class RewardArguments:
    """GRPO: what a completion is rewarded for, and the token budget of prompt plus completion.

    Each reward is a name: a metric of the recipe's task (ChartQA: `relaxed_accuracy`, `relaxed_accuracy_normalized`,
    `exact_match`; DocVQA: `anls`; ...), scored against the row's reference answers exactly as `evaluate` scores, or
    `answer_format` (1 when the completion has the form the task's answers take: a short answer on one line, one
    option letter for multiple choice). TRL's `reward_weights` weighs them, in the same order."""

    task: str | None = field(
        default=None,
        metadata={
            "help": "What the data is and how completions are scored: chartqa, docvqa, infovqa, textvqa, vqav2, "
            "multiple_choice or conversation (`vlm_recipes.tasks`). Sets the default `formatter`, the metrics the "
            "rewards can use and `max_completion_length`. Default: the task of the recipe's `formatter`."
        },
    )
    reward_functions: list[str] | None = field(
        default=None,
        metadata={
            "help": "The rewards, by name: the task's metrics and `answer_format`. Default: the task's headline metric "
            "(ChartQA: relaxed_accuracy) and answer_format, weighted 1.0 and 0.25 unless `reward_weights` says "
            "otherwise."
        },
    )
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "Longest prompt plus completion, in tokens (text plus image tokens). A row whose prompt plus "
            "`max_completion_length` does not fit is dropped (or its images downscaled, `too_long`) and counted in "
            "data_report.json, never cut inside its image tokens. Default: no limit."
        },
    )


@dataclass
class ReliabilityArguments:
    """Data checks before training (also run by `python -m vlm_recipes.preflight`) and fault guards during it."""

    check_data: bool = field(
        default=True,
        metadata={
            "help": "Before training, check every train and eval row: each image decodes in full and is converted to "
            "RGB and to a size the processor takes, the text is present, `<image>` placeholders match the images, "
            "and text plus image tokens fit `max_length`. Bad rows are skipped and counted in data_report.json."
        },
    )
    too_long: str = field(
        default="drop",
        metadata={
            "help": "A row longer than `max_length` (text plus image tokens) is dropped, or its images are downscaled "
            "until it fits (dropped if even the smallest images do not). Never truncated inside its image tokens.",
            "choices": ["drop", "downscale"],
        },
    )
    min_image_side: int = field(
        default=4,
        metadata={
            "help": "Images with a side shorter than this many pixels are rejected (a 1x1 image is a placeholder, "
            "not content). Longer sides the processor cannot take are scaled up to its minimum."
        },
    )
    special_tokens_in_text: str = field(
        default="reject",
        metadata={
            "help": "Text holding a special token of the model's tokenizer or chat template (`<|im_end|>`, `</s>`, "
            "`<image>`, a tool-call marker, ...) would be read as that control token, and learned in an answer. "
            "`reject` skips such a row and counts it naming the token; `escape` keeps it, with a zero-width space "
            "after the token's first character so that it tokenizes as plain text.",
            "choices": ["reject", "escape"],
        },
    )
    check_num_proc: int | None = field(
        default=None,
        metadata={
            "help": "Processes for the data checks. Default: `dataset_num_proc`, else one per CPU core (up to 8) for "
            "datasets over 2,000 rows, one process below that."
        },
    )
    stop_on_nonfinite_loss: bool = field(
        default=True,
        metadata={
            "help": "Stop training at the first NaN or infinite loss or gradient, before the optimizer applies it, "
            "naming the step and the last complete checkpoint."
        },
    )


@dataclass
class SpeedArguments:
    """Speed and memory features TRL does not have for vision data. Each is on by default where it is exact.

    Two more live in TRL's own fields: `train_sampling_strategy` (`group_by_length`, the default here, batches rows of
    similar true length together) and `padding_free` (SFT: each batch's rows packed into one sequence)."""

    length_group_batches: int = field(
        default=64,
        metadata={
            "help": "With `train_sampling_strategy: group_by_length`: rows are shuffled, cut into mega-batches of "
            "this many global batches, and sorted by true length (text + image tokens) inside each, so batches "
            "carry little padding while the training order stays random at the large scale."
        },
    )
    max_tokens_per_batch: int | None = field(
        default=None,
        metadata={
            "help": "Token-budget packing: each training micro-batch is as many rows as fit, first-fit-decreasing, "
            "into one sequence of at most this many tokens (text + image tokens), with no padding and each row's own "
            "position ids, so no row sees another; a row is never split. Replaces per_device_train_batch_size and "
            "train_sampling_strategy for training. SFT and DPO (a pair's chosen and rejected packed together); "
            "families whose attention keeps packed rows apart (the Qwen-VL families, LLaVA, LLaVA-Next, SmolVLM, "
            "Gemma 4). Pair it with attn_implementation: flash_attention_2 on GPUs (variable-length kernels)."
        },
    )
    vision_gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Gradient checkpointing inside the vision tower, when it trains: its blocks' activations are "
            "recomputed in the backward pass instead of kept. Unset: as `gradient_checkpointing`; false keeps the "
            "vision tower's activations (faster) while the language model is checkpointed; true checkpoints it "
            "alone."
        },
    )
    vision_chunk_images: int | None = field(
        default=None,
        metadata={
            "help": "Encode a batch's images through the vision tower this many at a time (Qwen-VL families), so a "
            "batch of many-image rows does not hold every image's vision activations at once. Same features."
        },
    )
    loss_on_labels_only: bool = field(
        default=True,
        metadata={
            "help": "Project hidden states through the output layer (LM head) only at positions that carry a label "
            "(the answers), never at prompt, image or pad positions. TRL does this on CUDA with Triton and scores "
            "every position elsewhere (CPU, MPS). Same loss and gradients."
        },
    )
    fast_collator: bool = field(
        default=True,
        metadata={
            "help": "Collate with TRL's vision collators' exact output, faster: the assistant-token mask in one "
            "vectorised pass instead of a Python loop over every token, and (DPO) each pair's images processed once "
            "instead of twice."
        },
    )
    reuse_image_features: bool = field(
        default=True,
        metadata={
            "help": "When the vision tower and projector are frozen and carry no adapter: DPO encodes each pair's "
            "images once and reuses the features for chosen, rejected, policy and reference passes (TRL encodes them "
            "four times); GRPO (Qwen-VL families) encodes each prompt's images once for its generations, the "
            "reference and the policy passes (TRL encodes them for every completion in each). Same loss."
        },
    )
