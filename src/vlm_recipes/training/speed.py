"""The speed and memory features a trainer gets from the recipe (`SpeedArguments`, `train_sampling_strategy`,
`padding_free`), as one mixin for TRL's trainers.

- Length-grouped batching by true token count (`training.sampling`), the default sampling strategy here.
- The LM head only at labelled positions (`loss_on_labels_only`): TRL 1.16's fused LM head already projects only the
  positions whose label is not -100 on devices with Triton (CUDA, XPU), and every position elsewhere (tiled, but the
  whole sequence: prompt, image and pad positions included). `compat.labelled_positions_only` makes it compact on
  every device; the kernels, and so the loss and gradients, are TRL's own.
- Padding-free batches for the Qwen-VL families (`training.padding_free`), SFT only.
- Faster collators with TRL's exact output (`training.collators`) and, for DPO, image features encoded once per batch
  (`training.image_features`): wired in by the trainers in `training.optimization`.
"""

import os
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils.data import SequentialSampler

from vlm_recipes.compat import add_trained_tokens, check_labelled_positions_only, labelled_positions_only
from vlm_recipes.configs import SpeedArguments
from vlm_recipes.console import print_main
from vlm_recipes.data.lengths import TokenCounter, dataset_token_lengths, padding_share
from vlm_recipes.modeling.families import ModelFamily
from vlm_recipes.training.collators import faster_collator
from vlm_recipes.training.padding_free import check_padding_free, pack_rows, packed_tokens
from vlm_recipes.training.sampling import LengthGroupedSampler


GROUP_BY_LENGTH = "group_by_length"
# Where TRL's and transformers' defaults leave speed on the table, unless the recipe sets the field itself.
SPEED_DEFAULTS = {"train_sampling_strategy": GROUP_BY_LENGTH}
MAX_DEFAULT_WORKERS = 4


def apply_speed_defaults(recipe: Any) -> None:
    """Our defaults for the training arguments, where the recipe is silent: length-grouped batching; on GPUs, image
    decoding and resizing in dataloader workers (on CPUs they would take cores from the training itself)."""
    defaults = dict(SPEED_DEFAULTS)
    if torch.cuda.is_available():
        per_process = (os.cpu_count() or 1) // max(1, torch.cuda.device_count())
        defaults["dataloader_num_workers"] = max(0, min(MAX_DEFAULT_WORKERS, per_process - 1))
    recipe.apply_defaults("training", defaults)


def take_padding_free(training_args: Any, family: ModelFamily) -> bool:
    """Whether the recipe asks for padding-free SFT batches (TRL's `padding_free` field), checked against the model
    family (before any data or weights load). The field is then switched off in TRL's arguments, which refuse it for
    vision data: the trainer packs the rows instead."""
    if not getattr(training_args, "padding_free", False):
        return False
    check_padding_free(family)
    training_args.padding_free = False
    return True


class SpeedMixin:
    """Put before a TRL trainer class. `speed` holds the recipe's `SpeedArguments`; `padding_free` packs SFT batches
    (checked against the model family by the entry point)."""

    def __init__(self, *args: Any, speed: SpeedArguments | None = None, padding_free: bool = False, **kwargs: Any):
        self.speed = speed or SpeedArguments()
        self.packs_rows = padding_free  # not `padding_free`: TRL's trainer sets its own
        self._row_lengths: list[int] | None = None
        if self.speed.loss_on_labels_only:
            check_labelled_positions_only()
        super().__init__(*args, **kwargs)
        if self.speed.fast_collator:
            self.data_collator = faster_collator(self.data_collator)

    # -- batching --------------------------------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if self.args.train_sampling_strategy != GROUP_BY_LENGTH:
            return super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self._row_lengths is None or len(self._row_lengths) != len(dataset):
            self._row_lengths = dataset_token_lengths(dataset, TokenCounter(self.processing_class))
        sampler = LengthGroupedSampler(
            self._row_lengths,
            self.args.per_device_train_batch_size,
            processes=self.args.world_size,
            group_batches=self.speed.length_group_batches,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
        )
        print_main(
            f"Batching: rows grouped by true length (text + image tokens); padding "
            f"{padding_share(self._row_lengths, self.args.per_device_train_batch_size, sampler.order()):.1%} of the "
            f"positions in this epoch's per-device batches"
        )
        return sampler

    def _get_eval_sampler(self, eval_dataset: Any) -> Any:
        """Evaluation keeps the dataset's order (transformers would group it with a sampler that needs a `length`
        or `pixel_values` column): what the default strategy gives it."""
        if self.args.train_sampling_strategy != GROUP_BY_LENGTH or eval_dataset is None:
            return super()._get_eval_sampler(eval_dataset)
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None

    # -- the forward -----------------------------------------------------------------------------------------------

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if self.packs_rows and "attention_mask" in inputs:
            tokens = packed_tokens(inputs)
            inputs = pack_rows(self.accelerator.unwrap_model(model), inputs)
            self._count_packed_tokens(tokens)
        labelled_only = labelled_positions_only() if self.speed.loss_on_labels_only else nullcontext()
        with labelled_only:
            return super().compute_loss(model, inputs, *args, **kwargs)

    def _count_packed_tokens(self, tokens: int) -> None:
        """TRL counts a batch without `attention_mask` by `position_ids.size(1)`, which is 1 for our (4, 1, N) ids:
        add what it misses, so `num_tokens` in the logs stays the number of real tokens trained on."""
        if not self.model.training:
            return
        missing = torch.tensor(tokens - 1, device=self.accelerator.device)
        add_trained_tokens(self, int(self.accelerator.gather_for_metrics(missing).sum().item()))
