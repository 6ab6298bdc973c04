"""TRL's vision collators with the same output, faster: the SFT assistant mask without a per-token loop, and each DPO
prompt with its images processed once.

What TRL 1.16 / transformers 5.24 do on their own (the private pieces relied on are in `vlm_recipes.compat`):
- `DataCollatorForVisionLanguageModeling` with `assistant_only_loss=True` calls `processor.apply_chat_template(...,
  return_assistant_tokens_mask=True)`; `ProcessorMixin._adjust_assistant_masks_indices` then walks every token of every
  row (image tokens included) in Python, unpacking tensor elements one by one: about half the collator's time on
  800x600 images.
- `DataCollatorForVisionPreference` processes `prompts * 2` with `images * 2` (chosen rows, then rejected rows), so
  every image is resized, normalized and patched twice.

What this module changes, and nothing else (tests compare every output tensor with TRL's):
- `VisionSFTCollator` computes the same mask with array operations (`assistant_token_masks`), put on the processor
  only for the duration of the call (`compat.shadowed_assistant_mask_method`): the processor is saved with
  `save_pretrained` and must not keep it. Where the processor has no such method (another transformers version), TRL's collator runs unchanged.
- `VisionPreferenceCollator` hands TRL's `torch_call` the processor behind `PromptsOnceProcessor`, which processes the
  doubled prompt call's (`compat.doubled_prompt_half`) first half and repeats every output along dim 0. That equals processing the doubled list
  because every output's dim 0 counts rows, images or image patches in image order, and padding goes to the longest
  row, which both halves share.

Both take exactly the constructor arguments of the TRL class they extend.
"""

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from vlm_recipes.compat import (
    ASSISTANT_MASK_METHOD,
    doubled_prompt_half,
    has_known_mask_method,
    original_assistant_masks,
    shadowed_assistant_mask_method,
)


logger = logging.getLogger(__name__)

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
        return original_assistant_masks(processor, processed_dict, generation_indices)
    processed_dict.pop("offset_mapping")
    replacement_offsets = processed_dict.pop("text_replacement_offsets", None)
    processed_dict["assistant_masks"] = as_output(
        assistant_token_masks(offsets, generation_indices, replacement_offsets)
    )
    return processed_dict


@functools.cache
def _warn_no_mask_method(processor_class: str) -> None:
    logger.warning(
        "%s has no %s(processed_dict, generation_indices) (another transformers version?); the SFT collator computes "
        "the assistant mask with transformers' own per-token loop.",
        processor_class,
        ASSISTANT_MASK_METHOD,
    )


class VisionSFTCollator(DataCollatorForVisionLanguageModeling):
    """TRL's `DataCollatorForVisionLanguageModeling`, same arguments and output; the assistant mask without a loop."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if not self.assistant_only_loss:  # no mask asked for: nothing to speed up
            return super().torch_call(examples)
        if not has_known_mask_method(self.processor):
            _warn_no_mask_method(type(self.processor).__name__)
            return super().torch_call(examples)
        with shadowed_assistant_mask_method(self.processor, adjust_assistant_masks_indices):
            return super().torch_call(examples)


# ---------------------------------------------------------------------------------------------------------------------
# DPO: each prompt and its images processed once


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
        half = doubled_prompt_half(args, kwargs)
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
