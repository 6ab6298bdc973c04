"""Padding-free batches for the Qwen-VL families: the rows of a batch packed into one sequence, no padding at all.

TRL refuses padding-free training for vision data. Packing is only correct if no row attends to another, and a
packed sequence only stays apart when the model can see where each row starts. For the Qwen-VL families (multimodal
RoPE) transformers 5.24 does this when, and only when:

- `position_ids` has four rows: the text positions, restarting at 0 with every packed row, then each row's own
  multimodal (temporal, height, width) RoPE ids from the model's `get_rope_index`; with only the three RoPE rows the
  rows silently attend to each other;
- `attention_mask` is None (a mask wins over the position ids);
- no KV cache is built (`use_cache=False`; TRL's `compute_loss` sets it).

Then flash-attention takes its variable-length path, and sdpa and eager build a block-diagonal causal mask (correct,
but dense: with sdpa the attention of a long packed sequence does masked work, so pair padding-free with
`attn_implementation: flash_attention_2` on GPUs). `pack_rows` builds exactly that form from the collator's
right-padded batch, on the device, just before the forward. Families whose forward cannot keep packed rows apart carry
a `padding_free_refusal` in the family table, and asking for padding-free there stops the run at the start.
"""

from typing import Any

import torch

from vlm_recipes.compat import add_trained_tokens
from vlm_recipes.errors import RecipeError
from vlm_recipes.modeling.families import ModelFamily


# Per-token tensors of a batch, packed like `input_ids`.
PER_TOKEN_KEYS = ("input_ids", "labels", "mm_token_type_ids", "token_type_ids")


def check_padding_free(family: ModelFamily) -> None:
    """Stop at the start when `padding_free` is asked of a family whose forward cannot keep packed rows apart."""
    if family.padding_free_refusal is not None:
        raise RecipeError(
            f"padding_free: true cannot be used with {family.name}: {family.padding_free_refusal}. Remove "
            "`padding_free` from the recipe; `train_sampling_strategy: group_by_length` (the default) already keeps "
            "padding to a few percent."
        )


def rope_model(model: Any) -> Any:
    """The module that owns `get_rope_index` inside a (PEFT-wrapped) Qwen-VL model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    if not hasattr(inner, "get_rope_index"):
        raise RecipeError(f"padding_free: {type(base).__name__} has no `get_rope_index` to build per-row positions.")
    return inner


def pack_rows(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """The right-padded batch as one padding-free sequence (batch size 1) with four-row position ids.

    `model` is the unwrapped model (PEFT allowed). Image tensors (`pixel_values`, `image_grid_thw`) are already flat
    over the batch's images, in row order, so they pass through unchanged.
    """
    attention_mask = batch["attention_mask"]
    keep = attention_mask.bool()
    rope_ids, _ = rope_model(model).get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch.get("mm_token_type_ids"),
        image_grid_thw=batch.get("image_grid_thw"),
        video_grid_thw=batch.get("video_grid_thw"),
        attention_mask=attention_mask,
    )
    text_positions = attention_mask.long().cumsum(-1) - 1  # restarts at 0 in every row
    position_ids = torch.cat([text_positions[keep][None], rope_ids.to(text_positions.device)[:, keep]])
    packed = {key: value for key, value in batch.items() if key != "attention_mask"}
    for key in PER_TOKEN_KEYS:
        if key in batch:
            packed[key] = batch[key][keep][None]
    if "labels" in packed:
        # The first token of a row would otherwise be predicted from the last token of the row before it.
        packed["labels"][0, text_positions[keep] == 0] = -100
    packed["position_ids"] = position_ids[:, None, :]  # (4, 1, tokens)
    return packed


def packed_tokens(batch: dict[str, Any]) -> int:
    """Tokens of a batch as `pack_rows` feeds them (its padding-free length)."""
    return int(batch["attention_mask"].sum())


def pack_for_forward(trainer: Any, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """In a trainer's `compute_loss`: the collator's batch packed (`pack_rows`), with the trainer's token count kept
    right. TRL counts a batch without `attention_mask` by `position_ids.size(1)`, which is 1 for the (4, 1, N) ids: what
    it misses is added, so `num_tokens` in the logs stays the number of real tokens trained on."""
    if "attention_mask" not in batch:
        return batch
    tokens = packed_tokens(batch)
    packed = pack_rows(trainer.accelerator.unwrap_model(model), batch)
    if trainer.model.training:
        missing = torch.tensor(tokens - 1, device=trainer.accelerator.device)
        add_trained_tokens(trainer, int(trainer.accelerator.gather_for_metrics(missing).sum().item()))
    return packed
