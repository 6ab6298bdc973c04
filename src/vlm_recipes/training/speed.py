"""The speed and memory features a trainer gets from the recipe (`SpeedArguments`, `train_sampling_strategy`,
`padding_free`); the trainers in `training.trainers` call them from their overrides.

- Length-grouped batching by true token count (`training.sampling`), the default sampling strategy here.
- The LM head only at labelled positions (`loss_on_labels_only`): TRL 1.16's fused LM head already projects only the
  positions whose label is not -100 on devices with Triton (CUDA, XPU), and every position elsewhere (tiled, but the
  whole sequence: prompt, image and pad positions included). `compat.labelled_positions_only` makes it compact on
  every device; the kernels, and so the loss and gradients, are TRL's own.
- Padding-free batches (`training.padding_free`): each batch's rows packed into one sequence (`padding_free`), or
  token-budget packing (`max_tokens_per_batch`): rows packed first-fit-decreasing into sequences of up to that many
  tokens (`training.sampling.TokenBudgetBatchSampler`), for the families whose attention keeps packed rows apart.
- Faster collators with TRL's exact output (`training.collators`) and, for DPO, image features encoded once per batch
  (`training.image_features`): wired in by the trainers in `training.trainers`.
"""

import os
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch.utils.data import SequentialSampler

from vlm_recipes.compat import check_labelled_positions_only, labelled_positions_only
from vlm_recipes.configs import SpeedArguments
from vlm_recipes.console import print_main
from vlm_recipes.data.lengths import TokenCounter, dataset_token_lengths, padding_share
from vlm_recipes.errors import RecipeError
from vlm_recipes.modeling.families import ModelFamily
from vlm_recipes.recipe import TrainingRecipe
from vlm_recipes.training.padding_free import check_padding_free
from vlm_recipes.training.sampling import LengthGroupedSampler, TokenBudgetBatchSampler, token_budget_sampler


GROUP_BY_LENGTH = "group_by_length"
# Where TRL's and transformers' defaults leave speed on the table, unless the recipe sets the field itself.
SPEED_DEFAULTS = {"train_sampling_strategy": GROUP_BY_LENGTH}
MAX_DEFAULT_WORKERS = 4


def apply_speed_defaults(recipe: TrainingRecipe, length_grouping: bool = True) -> None:
    """Our defaults for the training arguments, where the recipe is silent: length-grouped batching (unless the
    method samples rows its own way: GRPO repeats each prompt, KTO takes rows in order); on GPUs, image decoding and
    resizing in dataloader workers (on CPUs they would take cores from the training itself)."""
    defaults = dict(SPEED_DEFAULTS) if length_grouping else {}
    if torch.cuda.is_available():
        per_process = (os.cpu_count() or 1) // max(1, torch.cuda.device_count())
        defaults["dataloader_num_workers"] = max(0, min(MAX_DEFAULT_WORKERS, per_process - 1))
    recipe.set_defaults(recipe.training, defaults)


def take_padding_free(training_args: Any, family: ModelFamily, speed: SpeedArguments | None = None) -> bool:
    """Whether the trainer packs each batch's rows into one sequence: the recipe asks for padding-free batches (TRL's
    `padding_free` field) or token-budget packing (`max_tokens_per_batch`), checked against the model family (before
    any data or weights load). TRL's field is then switched off, as TRL refuses it for vision data (SFT) or ignores it
    (DPO): the trainer packs the rows instead."""
    budget = speed is not None and speed.max_tokens_per_batch is not None
    if not getattr(training_args, "padding_free", False) and not budget:
        return False
    check_padding_free(family)
    training_args.padding_free = False
    return True


def check_speed_settings(speed: SpeedArguments) -> None:
    """Stop at the start when a speed feature the recipe keeps on needs what the installed libraries lack."""
    if speed.loss_on_labels_only:
        check_labelled_positions_only()
    if speed.max_tokens_per_batch is not None and speed.max_tokens_per_batch < 1:
        raise RecipeError(
            f"max_tokens_per_batch must be a positive number of tokens, not {speed.max_tokens_per_batch}."
        )


def lm_head_positions(speed: SpeedArguments) -> AbstractContextManager:
    """Around a trainer's `compute_loss`: TRL's fused LM head at labelled positions only (`loss_on_labels_only`)."""
    return labelled_positions_only() if speed.loss_on_labels_only else nullcontext()


# ---------------------------------------------------------------------------------------------------------------------
# Length-grouped batching


def groups_by_length(args: Any) -> bool:
    """Whether the training arguments ask for length-grouped batches (`train_sampling_strategy`, our default)."""
    return args.train_sampling_strategy == GROUP_BY_LENGTH


def in_dataset_order(eval_dataset: Any, args: Any) -> Any:
    """The evaluation sampler under length grouping: the dataset's order (transformers would group it with a sampler
    that needs a `length` or `pixel_values` column), as the default strategy gives it; None (accelerate's own
    sharding) for several processes."""
    return SequentialSampler(eval_dataset) if args.world_size <= 1 else None


class LengthGrouping:
    """The training sampler of `train_sampling_strategy: group_by_length`, over each row's true token count (counted
    once per dataset, from image headers: `data.lengths`)."""

    def __init__(self, speed: SpeedArguments):
        self.group_batches = speed.length_group_batches
        self.row_lengths: list[int] | None = None

    def sampler(self, dataset: Any, processor: Any, args: Any) -> LengthGroupedSampler:
        if self.row_lengths is None or len(self.row_lengths) != len(dataset):
            self.row_lengths = dataset_token_lengths(dataset, TokenCounter(processor))
        sampler = LengthGroupedSampler(
            self.row_lengths,
            args.per_device_train_batch_size,
            processes=args.world_size,
            group_batches=self.group_batches,
            seed=args.data_seed if args.data_seed is not None else args.seed,
        )
        print_main(
            f"Batching: rows grouped by true length (text + image tokens); padding "
            f"{padding_share(self.row_lengths, args.per_device_train_batch_size, sampler.order()):.1%} of the "
            f"positions in this epoch's per-device batches"
        )
        return sampler


# ---------------------------------------------------------------------------------------------------------------------
# Token-budget packing


class TokenBudget:
    """The training batches of `max_tokens_per_batch`: rows packed first-fit-decreasing into sequences of up to that
    many true tokens (`training.sampling.TokenBudgetBatchSampler`); a preference pair counts with both its chosen and
    its rejected sequence, which are packed together."""

    def __init__(self, speed: SpeedArguments, all_conversations: bool = False):
        self.max_tokens = speed.max_tokens_per_batch
        self.all_conversations = all_conversations
        self.row_lengths: list[int] | None = None

    def sampler(self, dataset: Any, processor: Any, args: Any) -> TokenBudgetBatchSampler:
        if self.row_lengths is None or len(self.row_lengths) != len(dataset):
            counter = TokenCounter(processor)
            self.row_lengths = dataset_token_lengths(dataset, counter, all_conversations=self.all_conversations)
        sampler = token_budget_sampler(
            self.row_lengths,
            self.max_tokens,
            processes=args.world_size,
            process_index=args.process_index,
            seed=args.data_seed if args.data_seed is not None else args.seed,
        )
        batches = len(sampler.bins)
        fill = sum(self.row_lengths) / (batches * self.max_tokens) if batches else 0.0
        print_main(
            f"Batching: {len(self.row_lengths):,} rows packed first-fit-decreasing into {batches:,} sequences of at "
            f"most {self.max_tokens:,} tokens (text + image; {len(self.row_lengths) / max(1, batches):.1f} rows and "
            f"{fill:.0%} of the budget per sequence on average), no padding; per_device_train_batch_size is not used"
        )
        return sampler
