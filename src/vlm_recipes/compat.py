"""Every reach into a private part of TRL, transformers, peft, bitsandbytes or datasets, in one place.

Everywhere else the package uses these libraries' public API. What is reached into here is not promised to stay, so
`TESTED_VERSIONS` names the versions each piece was tested with (pyproject.toml pins the same series), and
`tests/test_compat.py` fails on any other installed version: an upgrade re-checks each piece below before it ships. A
run on an untested version says so once (`warn_if_untested`); each piece also checks for what it needs and falls back
to the library's own path, or stops with a clear message, where that is missing.

| piece                              | library      | what it relies on                                               |
| ---------------------------------- | ------------ | --------------------------------------------------------------- |
| `labelled_positions_only`          | trl          | `trl.trainer.utils._use_triton` decides the fused LM head's mode |
| `shadowed_assistant_mask_method`   | transformers | `ProcessorMixin._adjust_assistant_masks_indices(processed_dict, generation_indices)` |
| `num_image_tokens`                 | transformers | `processor._get_num_multimodal_tokens(image_sizes=...)`         |
| `doubled_prompt_half`              | trl          | `DataCollatorForVisionPreference` calls the processor once with `images=`, on `prompts * 2`, `images * 2` |
| `TRL_REFERENCE_ADAPTER`            | trl          | `DPOTrainer` names the frozen reference copy of an adapter "ref" |
| `add_trained_tokens`               | trl          | the trainers' token count `_total_train_tokens`                 |
| `count_tokens_of_global_batch`     | transformers | `Trainer.model_accepts_loss_kwargs` decides `num_items_in_batch` |
| `keep_dataset_column`              | transformers | `Trainer._remove_unused_columns` keeps the names in `_signature_columns` (`_set_signature_columns_if_needed`) |
| `take_over_checkpoint_rotation`    | transformers | `Trainer` rotates checkpoints by `args.save_total_limit` in `_save_checkpoint` |
| `OVERRIDDEN_TRAINER_HOOKS`         | transformers | `Trainer._get_train_sampler`, `Trainer._get_eval_sampler`        |
| `OVERRIDDEN_TRL_METHODS`           | trl          | `GRPOTrainer._generate_and_score_completions(inputs)`: one generation batch, generated and scored |
| `unsharded_batch_sampler`          | transformers | `Trainer._get_dataloader` passes a `BatchRebalanceSampler` as the batch sampler, unsharded |
| `set_layer_checkpointing`          | transformers | a `GradientCheckpointingLayer` checkpoints when `gradient_checkpointing` is set, with `_gradient_checkpointing_func` |
| `is_packed_4bit`                   | bitsandbytes | 4-bit weights are `Params4bit` parameters, two weights per byte |
| `keep_4bit_weights_trainable`      | bitsandbytes | `Linear4bit.support_avx512bf16_for_cpu` turns on its CPU inference repacking |
| `dataset_fingerprint`              | datasets     | `Dataset._fingerprint`, the cache key of a dataset's state      |
| `sdpa_attention`                   | transformers | `integrations.sdpa_attention.sdpa_attention_forward` and `masking_utils.sdpa_mask`, their arguments |
| `iterable_of_rows`                 | datasets     | `IterableDataset(ExamplesIterable(fn, kwargs), info)` reads `fn()`'s (key, row) pairs |
| `recorded_pair_results`            | trl          | `DPOTrainer._compute_loss`: policy forward, reference forward, then `loss += per_sequence_loss.mean() * loss_weight` per loss type, then `chosen_rewards > rejected_rewards` |
"""

import functools
import inspect
import logging
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from vlm_recipes.errors import RecipeError


logger = logging.getLogger(__name__)

# Installed versions every piece below was tested with: "major.minor" series (pyproject.toml pins the same).
TESTED_VERSIONS = {
    "trl": "1.16",
    "transformers": "5.24",
    "peft": "0.21",
    "bitsandbytes": "0.50",
    "datasets": "5.2",
}


def installed_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def untested_versions() -> list[str]:
    """ "package installed (tested: series)" for each installed package outside its tested series."""
    found = []
    for package, series in TESTED_VERSIONS.items():
        installed = installed_version(package)
        if installed is None or ".".join(installed.split(".")[:2]) != series:
            found.append(f"{package} {installed or 'not installed'} (tested: {series}.x)")
    return found


@functools.cache
def warn_if_untested() -> None:
    """Once per process: a warning naming the installed versions this package was not tested with."""
    untested = untested_versions()
    if untested:
        logger.warning(
            "vlm-recipes was not tested with %s: the pieces in vlm_recipes/compat.py reach into these libraries' "
            "private parts and may no longer fit. Install the tested versions (`make install`) for results you can "
            "trust.",
            ", ".join(untested),
        )


# ---------------------------------------------------------------------------------------------------------------------
# trl: the fused LM head


@contextmanager
def labelled_positions_only() -> Iterator[None]:
    """Within this block, TRL's fused LM head projects only labelled positions on every device.

    TRL decides per call with `trl.trainer.utils._use_triton(device)` whether to score only the labelled positions
    ("compact", on CUDA and XPU) or every position; compact gives the same per-token values (the masked positions are
    zero either way). The function is swapped for the block only, process-wide.
    """
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: True
    try:
        yield
    finally:
        trl_utils._use_triton = original


def check_labelled_positions_only() -> None:
    """Stop at the start if the installed TRL no longer has the fused LM head `labelled_positions_only` relies on."""
    import trl.trainer.utils as trl_utils

    if not callable(getattr(trl_utils, "_use_triton", None)) or not hasattr(trl_utils, "add_fused_lm_head"):
        raise RecipeError(
            "loss_on_labels_only needs the fused LM head of TRL 1.16 (trl.trainer.utils.add_fused_lm_head); the "
            "installed TRL has none. Set `loss_on_labels_only: false`."
        )


# ---------------------------------------------------------------------------------------------------------------------
# transformers: the processor's assistant-token mask


ASSISTANT_MASK_METHOD = "_adjust_assistant_masks_indices"
# The signature of the transformers 5.24 method whose semantics our replacement has.
ASSISTANT_MASK_PARAMETERS = ("self", "processed_dict", "generation_indices")


def has_known_mask_method(processor: Any) -> bool:
    """Whether the processor's class has the transformers method a replacement may shadow, with its signature."""
    method = getattr(type(processor), ASSISTANT_MASK_METHOD, None)
    if method is None:
        return False
    return tuple(inspect.signature(method).parameters) == ASSISTANT_MASK_PARAMETERS


def original_assistant_masks(processor: Any, processed_dict: Any, generation_indices: list) -> Any:
    """The class's own (per-token loop) method, for inputs a replacement does not handle."""
    return getattr(type(processor), ASSISTANT_MASK_METHOD)(processor, processed_dict, generation_indices)


@contextmanager
def shadowed_assistant_mask_method(processor: Any, replacement: Callable[..., Any]) -> Iterator[None]:
    """While inside, the processor computes assistant masks with `replacement(processor, processed_dict,
    generation_indices)`.

    An instance attribute shadows the class's method; it is removed on exit, also on an error, so that nothing of it is
    pickled to dataloader workers afterwards or saved with the processor. Nested use keeps the outer one.
    """
    if ASSISTANT_MASK_METHOD in vars(processor):
        yield
        return
    setattr(processor, ASSISTANT_MASK_METHOD, types.MethodType(replacement, processor))
    try:
        yield
    finally:
        delattr(processor, ASSISTANT_MASK_METHOD)


# ---------------------------------------------------------------------------------------------------------------------
# transformers: image tokens from the processor's own size rule


def num_image_tokens(processor: Any, width: int, height: int) -> int | None:
    """Tokens one image of this size expands into, by the processor's own resize rule (no pixels needed); None for a
    processor without the rule. Raises `ValueError` for a size the processor cannot take."""
    rule = getattr(processor, "_get_num_multimodal_tokens", None)
    if rule is None:
        return None
    try:
        return int(rule(image_sizes=[(height, width)])["num_image_tokens"][0])
    except (NotImplementedError, KeyError, TypeError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------------------------------
# trl: the vision DPO collator's processor call, and its reference adapter


# The name TRL's DPOTrainer gives the frozen copy it makes of an adapter it is handed (the reference).
TRL_REFERENCE_ADAPTER = "ref"


def doubled_prompt_half(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """n when a processor call is TRL 1.16's doubled prompt call, else None.

    `DataCollatorForVisionPreference` calls the processor once with `images=`, all by keyword, on `prompts * 2` and
    `images * 2` (chosen rows, then rejected rows): `text` is a list of 2n items whose second half repeats the first,
    and `images` (unless None) repeats the very same per-row lists (compared by identity: no pixel is read).
    """
    if args or "images" not in kwargs:
        return None
    text, images = kwargs.get("text"), kwargs["images"]
    if not isinstance(text, list) or len(text) % 2:
        return None
    half = len(text) // 2
    if text[:half] != text[half:]:
        return None
    if images is not None:
        if not isinstance(images, list) or len(images) != len(text):
            return None
        if any(first is not second for first, second in zip(images[:half], images[half:])):
            return None
    return half


# ---------------------------------------------------------------------------------------------------------------------
# trl: the DPO loss of each pair, before TRL's mean over the batch


# TRL 1.16's DPO loss types whose per-pair value is not the pair's own: "sft" spreads the batch's token mean over the
# pairs, "aot" and "aot_unpaired" pair the batch's sorted log-ratios, not a pair's chosen with its rejected.
BATCH_MIXING_DPO_LOSSES = frozenset({"sft", "aot", "aot_unpaired"})


class _LossWeight(float):
    """A DPO loss weight that marks TRL's `per_sequence_loss.mean() * loss_weight`; a float everywhere else."""


def mark_dpo_loss_weights(trainer: Any) -> None:
    """Make the trainer's DPO loss weights (`DPOTrainer.loss_weights`, one per loss type) recognisable to
    `recorded_pair_results`; their values do not change."""
    trainer.loss_weights = [_LossWeight(weight) for weight in trainer.loss_weights]


@dataclass
class PairResults:
    """What `recorded_pair_results` saw of TRL's DPO loss, each tensor detached, of shape (pairs,)."""

    losses: list[Any] = field(default_factory=list)  # per loss type: the pairs' losses times the type's weight
    reward_accuracies: list[Any] = field(default_factory=list)  # chosen reward > rejected reward, as TRL compares them


DPO_FORWARDS_BEFORE_LOSS = 2  # `DPOTrainer._compute_loss`: the policy's forward, then the reference's, then the loss


@contextmanager
def recorded_pair_results(*models: Any) -> Iterator[PairResults]:
    """Within the block, TRL 1.16's DPO loss of each pair and its reward comparison, as `DPOTrainer._compute_loss`
    computes them before its means, without rewriting either:
    - losses: every `per_sequence_loss` it averages and weighs (`loss += per_sequence_loss.mean() * loss_weight`, WPO
      weighting included), times its weight; their sum over the loss types is each pair's loss (needs
      `mark_dpo_loss_weights`: the product with a marked weight is what tells this mean from the metrics' means);
    - reward_accuracies: `chosen_rewards > rejected_rewards`, the one comparison of two tensors of one value per pair
      it makes after the loss (the model's forward makes others).
    A torch function mode sees these calls go by; every other call passes through unchanged. With `models` (the policy
    as TRL calls it, unwrapped, and a separate reference model or None), the mode starts only once the policy and the
    reference forwards are done (`DPO_FORWARDS_BEFORE_LOSS`), so the models' thousands of calls do not pass through
    it; without, it sees the whole block."""
    import torch
    from torch.overrides import TorchFunctionMode

    results = PairResults()

    class PairResultsMode(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.means: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(mean) -> (mean, what it averages)

        def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            result = func(*args, **(kwargs or {}))
            if func is torch.Tensor.mean:
                if len(args) == 1 and not kwargs and args[0].dim() == 1:
                    self.means[id(result)] = (result, args[0])
            elif func is torch.Tensor.mul:
                if len(args) == 2 and isinstance(args[1], _LossWeight):
                    mean, averaged = self.means.get(id(args[0]), (None, None))
                    if mean is args[0]:
                        results.losses.append(averaged.detach().float() * float(args[1]))
            elif func is torch.Tensor.gt and results.losses and len(args) == 2:  # after the loss, the metrics
                pairs = results.losses[0].shape
                if all(isinstance(arg, torch.Tensor) and arg.shape == pairs for arg in args):
                    results.reward_accuracies.append(result.detach().float())
            return result

    mode = PairResultsMode()
    if not models:
        with mode:
            yield results
        return
    forwards, handles = [], []

    def forward_done(module: Any, args: tuple, output: Any) -> None:
        forwards.append(module)
        if len(forwards) == DPO_FORWARDS_BEFORE_LOSS:
            mode.__enter__()  # left in the `finally` below: nothing else enters a mode within TRL's loss

    for model in models:
        if model is not None:
            handles.append(model.register_forward_hook(forward_done))
    try:
        yield results
    finally:
        for handle in handles:
            handle.remove()
        if len(forwards) >= DPO_FORWARDS_BEFORE_LOSS:
            mode.__exit__(None, None, None)


# ---------------------------------------------------------------------------------------------------------------------
# transformers Trainer and TRL's trainers


# Private Trainer methods the package's trainers override (`training.speed`): the train and evaluation samplers.
OVERRIDDEN_TRAINER_HOOKS = {
    "_get_train_sampler": ("self", "train_dataset"),
    "_get_eval_sampler": ("self", "eval_dataset"),
}


def missing_trainer_hooks() -> list[str]:
    """The overridden hooks the installed Trainer no longer has with the parameters the overrides take."""
    from transformers import Trainer

    return [
        name
        for name, parameters in OVERRIDDEN_TRAINER_HOOKS.items()
        if tuple(inspect.signature(getattr(Trainer, name, lambda: None)).parameters) != parameters
    ]


# Private TRL methods the package's trainers override (`training.trainers.VLMGRPOTrainer`: the image features of one
# generation batch are served around it): class, method -> parameters.
OVERRIDDEN_TRL_METHODS = {("GRPOTrainer", "_generate_and_score_completions"): ("self", "inputs")}


def missing_trl_methods() -> list[str]:
    """The overridden TRL methods the installed TRL no longer has with the parameters the overrides take."""
    import trl

    missing = []
    for (class_name, method), parameters in OVERRIDDEN_TRL_METHODS.items():
        function = getattr(getattr(trl, class_name, None), method, None)
        if function is None or tuple(inspect.signature(function).parameters) != parameters:
            missing.append(f"{class_name}.{method}")
    return missing


@functools.cache
def _unsharded_batch_sampler_class() -> type:
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    class UnshardedBatchSampler(BatchRebalanceSampler):
        """A batch sampler of this process's own batches, seen by the Trainer as its rank-aware kind."""

        def __init__(self, batch_sampler: Any):  # BatchRebalanceSampler's own state is not used
            self.batch_sampler = batch_sampler

        def __iter__(self) -> Iterator[list[int]]:
            return iter(self.batch_sampler)

        def __len__(self) -> int:
            return len(self.batch_sampler)

        def set_epoch(self, epoch: int) -> None:
            self.batch_sampler.set_epoch(epoch)

    return UnshardedBatchSampler


def unsharded_batch_sampler(batch_sampler: Any) -> Any:
    """`batch_sampler` (this process's own batches of row indices, of any size) as `_get_train_sampler` can return it.

    transformers 5.24's `Trainer._get_dataloader` hands a `BatchRebalanceSampler` to the DataLoader as its
    `batch_sampler` (not a row sampler to cut into `per_device_train_batch_size` batches) and keeps accelerate from
    sharding it over the processes again; the wrapper is one, and forwards `set_epoch`."""
    return _unsharded_batch_sampler_class()(batch_sampler)


def set_layer_checkpointing(layer: Any, enabled: bool) -> None:
    """Switch gradient checkpointing of one transformers layer (a `GradientCheckpointingLayer`, such as a vision block)
    on or off, whatever the model-wide setting; on, it recomputes non-reentrantly (transformers 5.24's default)."""
    import torch.utils.checkpoint

    if enabled and getattr(layer, "_gradient_checkpointing_func", None) is None:
        layer._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    layer.gradient_checkpointing = enabled


def add_trained_tokens(trainer: Any, tokens: int) -> None:
    """Add to the count of tokens trained on that TRL's trainers log as `num_tokens` (`_total_train_tokens`)."""
    if hasattr(trainer, "_total_train_tokens"):
        trainer._total_train_tokens += tokens


def count_tokens_of_global_batch(trainer: Any) -> None:
    """Have the Trainer count the labelled tokens of the whole global batch (`num_items_in_batch`) for every model.

    Models that declare `accepts_loss_kwargs = False` (the Qwen-VL families) make the Trainer skip the count, so TRL's
    loss would be a mean of per-process and per-accumulation-step token means. TRL computes the loss itself from the
    log-probabilities and divides by `num_items_in_batch` when it gets it, so the count is right for any model."""
    trainer.model_accepts_loss_kwargs = True


def keep_dataset_column(trainer: Any, column: str) -> None:
    """Have the Trainer hand `column` of its datasets to the collator: with `remove_unused_columns` (the default) it
    drops every column outside `_signature_columns`, which TRL's trainers set to what their collators read."""
    trainer._set_signature_columns_if_needed()
    if column not in trainer._signature_columns:
        trainer._signature_columns = [*trainer._signature_columns, column]


def take_over_checkpoint_rotation(args: Any) -> int | None:
    """`args.save_total_limit`, taken from the Trainer (which deletes old checkpoints right after writing a new one,
    in `_save_checkpoint`) so that the caller rotates them once the new one is marked complete."""
    limit, args.save_total_limit = args.save_total_limit, None
    return limit


# ---------------------------------------------------------------------------------------------------------------------
# bitsandbytes and datasets


def is_packed_4bit(parameter: Any) -> bool:
    """A bitsandbytes 4-bit weight: its storage packs two weights per byte, so `numel()` counts half of them."""
    return type(parameter).__name__ == "Params4bit"


def keep_4bit_weights_trainable(model: Any) -> int:
    """Turn off bitsandbytes' inference-only repacking of 4-bit weights on CPUs in a model that trains; returns how many
    4-bit layers it applies to.

    bitsandbytes 0.50 (`Linear4bit.forward`): on a CPU with AVX512-BF16 (the layer's `support_avx512bf16_for_cpu`), the
    first forward of a 4-bit layer in eval mode without gradients repacks its weight in place into a layout only an
    inference kernel reads (`quant_state.packing_format_for_cpu`), and the layer keeps it after `model.train()`. An
    evaluation during training (`eval_strategy`) is exactly that forward; the next training step then goes through the
    inference kernel, which has no backward: "a view of a leaf Variable that requires grad is being used in an in-place
    operation", or silently wrong gradients for the layers below. Training therefore keeps the trainable layout, and
    evaluation during training runs bitsandbytes' ordinary 4-bit path, as training does. A layer without the attribute
    (another bitsandbytes) is left as it is."""
    from bitsandbytes.nn import Linear4bit

    layers = [
        module
        for module in model.modules()
        if isinstance(module, Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu")
    ]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def dataset_fingerprint(dataset: Any) -> str:
    """The datasets library's fingerprint of a dataset's current state (the key of its cache files)."""
    return dataset._fingerprint


def sdpa_attention() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """transformers' sdpa attention function and its mask builder (`integrations.sdpa_attention.sdpa_attention_forward`
    and `masking_utils.sdpa_mask`): a function registered with their signatures under a new name in
    `AttentionInterface` / `AttentionMaskInterface` gets exactly sdpa's masks and calls (transformers 5.24)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    return sdpa_attention_forward, sdpa_mask


def iterable_of_rows(generate: Callable[[], Iterator[dict[str, Any]]], features: Any = None) -> Any:
    """A datasets `IterableDataset` whose rows are `generate()`'s, a fresh generator each pass. The public
    `IterableDataset.from_generator` hashes the generator and everything it closes over (a processor, other streams:
    seconds, or an error) to name a cache a stream never writes."""
    from datasets import DatasetInfo, IterableDataset
    from datasets.iterable_dataset import ExamplesIterable

    def keyed() -> Iterator[tuple[int, dict[str, Any]]]:
        yield from enumerate(generate())

    return IterableDataset(ExamplesIterable(keyed, {}), info=DatasetInfo(features=features))
