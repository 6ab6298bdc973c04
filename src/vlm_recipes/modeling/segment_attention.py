"""Exact attention for packed rows where flash-attention's variable-length kernels do not run: sdpa, one row at a time.

Over a packed sequence (`training.padding_free`), transformers' sdpa builds a block-diagonal causal mask and attends
over the whole sequence: (sum of the rows' lengths)^2 score elements, where the rows need only the sum of their
squares, so packing ran slower than length grouping on CPUs. `SEGMENT_SDPA` is transformers' sdpa (its mask builder,
its kernel call) with one change: a packed sequence (batch 1, text positions restarting with each row) is cut at the
row starts, and each row attends to itself with its own diagonal block of transformers' mask. The blocks off the
diagonal are all masked in a packed sequence, so the result is the same; a family's sliding window or bidirectional
image block stays as transformers built it, and a block that is exactly causal runs sdpa's causal kernel (which skips
the upper triangle). Anything else (padded batches, the vision tower, generation with a cache) runs sdpa unchanged.

`attend_per_segment` switches a model's language model from sdpa to it; the trainers do so when they pack rows.
Flash-attention (`attn_implementation: flash_attention_2`, the default on CUDA GPUs where it is installed) keeps its
own variable-length path, and eager or any other implementation the recipe names is left alone.
"""

from typing import Any

import torch

from vlm_recipes.compat import sdpa_attention


SEGMENT_SDPA = "vlm_recipes_segment_sdpa"
SDPA = "sdpa"


def row_starts(position_ids: torch.Tensor) -> list[int]:
    """Where each packed row starts in a (1, tokens) row of text positions, plus the end: a row starts wherever the
    position does not follow the one before by 1 (transformers' own rule for packed sequences)."""
    positions = position_ids.reshape(-1)
    breaks = torch.nonzero(positions[1:] - positions[:-1] != 1).flatten() + 1
    return [0, *breaks.tolist(), positions.numel()]


def segment_sdpa_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention function, run row by row over a packed sequence (see the module docstring)."""
    sdpa_forward, _ = sdpa_attention()
    position_ids = kwargs.pop("position_ids", None)
    packed = (
        position_ids is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2] == position_ids.shape[-1]  # no cache: queries and keys are the sequence
        and kwargs.get("is_causal", getattr(module, "is_causal", True))
    )
    starts = row_starts(position_ids) if packed else []
    if len(starts) <= 2:  # one row, or not a packed sequence
        return sdpa_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    outputs = []
    for start, end in zip(starts[:-1], starts[1:]):
        block = None if attention_mask is None else attention_mask[..., start:end, start:end]
        if block is not None and block.dtype == torch.bool and torch.equal(block, causal_block(end - start, block)):
            block = None  # exactly causal: sdpa's causal kernel
        piece = (slice(None), slice(None), slice(start, end))
        output, _ = sdpa_forward(
            module, query[piece], key[piece], value[piece], block, is_causal=block is None, **kwargs
        )
        outputs.append(output)  # (1, row length, heads, head size)
    return torch.cat(outputs, dim=1), None


def causal_block(length: int, like: torch.Tensor) -> torch.Tensor:
    """The boolean causal mask of one row, shaped like a block of transformers' 4-D mask."""
    causal = torch.ones(length, length, dtype=torch.bool, device=like.device).tril()
    return causal.expand(like.shape)


def register_segment_sdpa() -> None:
    """Make `SEGMENT_SDPA` a name transformers' models accept as `attn_implementation` (with sdpa's masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    _, sdpa_mask = sdpa_attention()
    AttentionInterface.register(SEGMENT_SDPA, segment_sdpa_forward)
    AttentionMaskInterface.register(SEGMENT_SDPA, sdpa_mask)


def language_config(model: Any) -> Any:
    """The config whose `_attn_implementation` the language model's attention layers read (None: not a transformers
    model, such as a reference model inside a DeepSpeed engine)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    return getattr(config, "text_config", None) or config


def attend_per_segment(model: Any) -> bool:
    """Switch the language model of `model` (PEFT allowed) from sdpa to `SEGMENT_SDPA`; the vision tower keeps its
    own. Returns whether it switched: not for flash-attention, eager or any other implementation."""
    if model is None or getattr(language_config(model), "_attn_implementation", None) != SDPA:
        return False
    register_segment_sdpa()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "text_config", None) is None:
        base.set_attn_implementation(SEGMENT_SDPA)
    else:
        base.set_attn_implementation({"text_config": SEGMENT_SDPA})
    return language_config(model)._attn_implementation == SEGMENT_SDPA
