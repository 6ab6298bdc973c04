"""TRL's vision collators with the same output, faster: the SFT assistant mask without a per-token loop, and each DPO
prompt with its images processed once.

What TRL 1.16 / transformers 5.24 do on their own:
- `DataCollatorForVisionLanguageModeling` with `assistant_only_loss=True` calls `processor.apply_chat_template(...,
  return_assistant_tokens_mask=True)`; `ProcessorMixin._adjust_assistant_masks_indices` then walks every token of every
  row (image tokens included) in Python, unpacking tensor elements one by one: about half the collator's time on
  800x600 images.
- `DataCollatorForVisionPreference` processes `prompts * 2` with `images * 2` (chosen rows, then rejected rows), so
  every image is resized, normalized and patched twice.

What this module changes, and nothing else (tests compare every output tensor with TRL's):
- `VisionSFTCollator` computes the same mask with array operations (`assistant_token_masks`), put on the processor as
  an instance attribute only for the duration of the call: the processor is saved with `save_pretrained` and must not
  keep it. Where the processor has no such method (another transformers version), TRL's collator runs unchanged.
- `VisionPreferenceCollator` hands TRL's `torch_call` the processor behind `PromptsOnceProcessor`, which processes the
  doubled prompt call's first half and repeats every output along dim 0. That equals processing the doubled list
  because every output's dim 0 counts rows, images or image patches in image order, and padding goes to the longest
  row, which both halves share.

Both take exactly the constructor arguments of the TRL class they extend.
"""

import dataclasses
import functools
import inspect
import logging
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling


logger = logging.getLogger(__name__)

MASK_METHOD = "_adjust_assistant_masks_indices"
# The signature of the transformers 5.24 method our replacement has the semantics of.
MASK_METHOD_PARAMETERS = ("self", "processed_dict", "generation_indices")


# ---------------------------------------------------------------------------------------------------------------------
# SFT: the assistant-token mask


def shifted_spans(spans: Sequence[Sequence[int]], replacements: Sequence[dict[str, Any]]) -> np.ndarray:
    """A row's assistant character spans in the processed text: each end moved past the placeholders expanded before it.

    `replacements` are the row's `text_replacement_offsets` (in text order): a placeholder at `span` in the rendered
    text became `new_span`; `new_span[1] - span[1]` is what all expansions up to that one added.
    """
    chars = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    placeholder_ends = np.array([r["span"][1] for r in replacements], dtype=np.int64)
    chars_gained = np.array([0] + [r["new_span"][1] - r["span"][1] for r in replacements], dtype=np.int64)
    # side="right" is bisect.bisect_right: a span starting exactly at a placeholder's end is shifted past it
    return chars + chars_gained[np.searchsorted(placeholder_ends, chars, side="right")]


def row_assistant_mask(token_offsets: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """1 for every token overlapping one of the spans, else 0. Zero-width tokens (padding, added specials) match none."""
    starts, ends = token_offsets[:, :1], token_offsets[:, 1:]
    overlaps = (starts < spans[:, 1]) & (ends > spans[:, 0])  # tokens x spans
    return overlaps.any(axis=1).astype(np.int64)


def assistant_token_masks(
    offset_mapping: np.ndarray, generation_indices: Sequence[Sequence[Sequence[int]]], replacement_offsets: Any
) -> np.ndarray:
    """The batch's assistant mask (rows x tokens, int64): `_adjust_assistant_masks_indices` without the token loop."""
    if replacement_offsets is None or len(replacement_offsets) == 0:
        replacement_offsets = [[]] * len(offset_mapping)
    masks = np.zeros(offset_mapping.shape[:2], dtype=np.int64)
    for row, (spans, replacements) in enumerate(zip(generation_indices, replacement_offsets)):
        if len(spans):
            masks[row] = row_assistant_mask(offset_mapping[row], shifted_spans(spans, replacements))
    return masks


def adjust_assistant_masks_indices(processor: Any, processed_dict: Any, generation_indices: list) -> Any:
    """Drop-in for `ProcessorMixin._adjust_assistant_masks_indices` (bound to the processor while it is installed).

    Returns the mask as the tensor type of `offset_mapping` (torch int64, as transformers makes of its list of ints);
    offsets that are neither a tensor nor an array (ragged lists, no `return_tensors`) go to the original method.
    """
    offset_mapping = processed_dict["offset_mapping"]
    if isinstance(offset_mapping, torch.Tensor):
        as_output = torch.from_numpy
        offsets = offset_mapping.numpy(force=True)
    elif isinstance(offset_mapping, np.ndarray):
        as_output, offsets = (lambda masks: masks), offset_mapping
    else:
        return getattr(type(processor), MASK_METHOD)(processor, processed_dict, generation_indices)
    processed_dict.pop("offset_mapping")
    replacement_offsets = processed_dict.pop("text_replacement_offsets", None)
    processed_dict["assistant_masks"] = as_output(
        assistant_token_masks(offsets, generation_indices, replacement_offsets)
    )
    return processed_dict


def has_known_mask_method(processor: Any) -> bool:
    """Whether the processor's class has the transformers method our replacement mirrors, with its signature."""
    method = getattr(type(processor), MASK_METHOD, None)
    if method is None:
        return False
    return tuple(inspect.signature(method).parameters) == MASK_METHOD_PARAMETERS


@functools.cache
def _warn_no_mask_method(processor_class: str) -> None:
    logger.warning(
        "%s has no %s(processed_dict, generation_indices) (another transformers version?); the SFT collator computes "
        "the assistant mask with transformers' own per-token loop.",
        processor_class,
        MASK_METHOD,
    )


@contextmanager
def vectorised_assistant_masks(processor: Any) -> Iterator[None]:
    """While inside, the processor computes assistant masks with `adjust_assistant_masks_indices`.

    An instance attribute shadows the class's method; it is removed on exit, also on an error, so that nothing of it is
    pickled to dataloader workers afterwards or saved with the processor. Nested use keeps the outer one.
    """
    if MASK_METHOD in vars(processor):
        yield
        return
    setattr(processor, MASK_METHOD, types.MethodType(adjust_assistant_masks_indices, processor))
    try:
        yield
    finally:
        delattr(processor, MASK_METHOD)


class VisionSFTCollator(DataCollatorForVisionLanguageModeling):
    """TRL's `DataCollatorForVisionLanguageModeling`, same arguments and output; the assistant mask without a loop."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if not self.assistant_only_loss:  # no mask asked for: nothing to speed up
            return super().torch_call(examples)
        if not has_known_mask_method(self.processor):
            _warn_no_mask_method(type(self.processor).__name__)
            return super().torch_call(examples)
        with vectorised_assistant_masks(self.processor):
            return super().torch_call(examples)


# ---------------------------------------------------------------------------------------------------------------------
# DPO: each prompt and its images processed once


def _first_half_if_doubled(text: Any, images: Any) -> int | None:
    """n when `text` (and `images`, unless None) are a list of 2n items whose second half repeats the first, as TRL's
    `prompts * 2` and `images * 2` are; None otherwise."""
    if not isinstance(text, list) or len(text) % 2:
        return None
    half = len(text) // 2
    if text[:half] != text[half:]:
        return None
    if images is not None:
        # `images * 2` repeats the very same per-row lists; comparing identities never touches pixels
        if not isinstance(images, list) or len(images) != len(text):
            return None
        if any(first is not second for first, second in zip(images[:half], images[half:])):
            return None
    return half


def _repeated(value: Any) -> Any:
    """The value twice along dim 0 (tensors) or as a list; None for anything else."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return torch.cat((value, value))
    if isinstance(value, list):
        return value + value
    return None


class PromptsOnceProcessor:
    """The processor, except for a call with `images=` on a doubled list: the first half is processed and every output
    repeated along dim 0. Every other attribute and call goes to the processor itself."""

    def __init__(self, processor: Any):
        self.processor = processor

    def __getattr__(self, name: str) -> Any:
        if name == "processor":  # not set yet (a copy being made): no endless lookup
            raise AttributeError(name)
        return getattr(self.processor, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # TRL passes everything by keyword; its one call with `images=` is the doubled prompt call
        half = None if args or "images" not in kwargs else _first_half_if_doubled(kwargs.get("text"), kwargs["images"])
        if half is None:
            return self.processor(*args, **kwargs)
        images = kwargs["images"]
        once = self.processor(**{**kwargs, "text": kwargs["text"][:half], "images": images and images[:half]})
        doubled = {key: _repeated(value) for key, value in once.items()}
        if any(value is None for value in doubled.values()):  # an output we cannot repeat: process it all, as TRL
            return self.processor(*args, **kwargs)
        once.update(doubled)
        return once


class VisionPreferenceCollator(DataCollatorForVisionPreference):
    """TRL's `DataCollatorForVisionPreference`, same arguments and output; each prompt and its images processed once."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        # TRL's own torch_call on a copy of this collator that sees the processor through the proxy
        with_proxy = dataclasses.replace(self, processor=PromptsOnceProcessor(self.processor))
        return DataCollatorForVisionPreference.torch_call(with_proxy, examples)


FASTER = {
    DataCollatorForVisionLanguageModeling: VisionSFTCollator,
    DataCollatorForVisionPreference: VisionPreferenceCollator,
}


def faster_collator(collator: Any) -> Any:
    """Ours in place of the TRL vision collator a trainer built, with the same settings; any other collator as is."""
    faster = FASTER.get(type(collator))
    if faster is None:
        return collator
    return faster(**{field.name: getattr(collator, field.name) for field in dataclasses.fields(collator)})
