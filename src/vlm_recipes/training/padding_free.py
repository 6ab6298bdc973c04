"""Padding-free batches: the rows of a batch packed into one sequence, no padding at all.

TRL refuses padding-free training for vision data. Packing is only correct if no row attends to another, and a
packed sequence only stays apart when the model can see where each row starts. transformers 5.24 does this when, and
only when:

- the position ids restart at 0 with every packed row. For the Qwen-VL families (multimodal RoPE) `position_ids` has
  four rows: those text positions, then each row's own (temporal, height, width) RoPE ids from the model's
  `get_rope_index`; with only the three RoPE rows the rows silently attend to each other. Families with ordinary
  RoPE (LLaVA, LLaVA-Next, SmolVLM, Gemma 4) take the text positions as one row;
- `attention_mask` is None (a mask wins over the position ids);
- no KV cache is built (`use_cache=False`; TRL's `compute_loss` sets it).

Then flash-attention takes its variable-length path, and sdpa and eager build a block-diagonal causal mask (correct,
but dense: masked work across rows). The trainers switch sdpa to attending one packed row at a time
(`modeling.segment_attention`), which does no work across rows. `pack_rows` builds exactly that form from the collator's padded
batch (right or left padding), on the device, just before the forward. Each family's per-row log-probabilities are
tested against its rows run alone (tests/test_speed.py). Families whose forward cannot keep packed rows apart carry a
`padding_free_refusal` in the family table, and asking for padding-free or token-budget packing there stops the run at
the start.

DPO packs a pair's chosen and rejected sequences (and every pair of the batch) into one sequence: `packed_forward`
packs the padded inputs TRL's DPO loss hands the model and puts the per-token log-probabilities back in the padded
layout TRL reads (`unpack_positions`), so TRL's loss code runs unchanged.
"""

from collections.abc import Iterator
from contextlib import contextmanager
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
            f"padding_free: true and max_tokens_per_batch cannot be used with {family.name}: "
            f"{family.padding_free_refusal}. Remove them from the recipe; `train_sampling_strategy: group_by_length` "
            "(the default) already keeps padding to a few percent."
        )


def multimodal_rope_model(model: Any) -> Any | None:
    """The module that owns `get_rope_index` inside a (PEFT-wrapped) Qwen-VL model; None for ordinary RoPE."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    return inner if hasattr(inner, "get_rope_index") else None


def pack_rows(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """The padded batch as one padding-free sequence (batch size 1) whose position ids restart with every row.

    `model` is the unwrapped model (PEFT allowed). Image tensors (`pixel_values`, `image_grid_thw`, ...) are already
    flat over the batch's images, in row order, so they pass through unchanged.
    """
    attention_mask = batch["attention_mask"]
    keep = attention_mask.bool()
    text_positions = attention_mask.long().cumsum(-1) - 1  # restarts at 0 in every row; -1 on left padding
    rope = multimodal_rope_model(model)
    if rope is not None:
        rope_ids, _ = rope.get_rope_index(
            batch["input_ids"],
            mm_token_type_ids=batch.get("mm_token_type_ids"),
            image_grid_thw=batch.get("image_grid_thw"),
            video_grid_thw=batch.get("video_grid_thw"),
            attention_mask=attention_mask,
        )
        position_ids = torch.cat([text_positions[keep][None], rope_ids.to(text_positions.device)[:, keep]])
        position_ids = position_ids[:, None, :]  # (4, 1, tokens)
    else:
        position_ids = text_positions[keep][None]  # (1, tokens)
    packed = {key: value for key, value in batch.items() if key != "attention_mask"}
    for key in PER_TOKEN_KEYS:
        if key in batch:
            packed[key] = batch[key][keep][None]
    if "labels" in packed:
        # The first token of a row would otherwise be predicted from the last token of the row before it.
        packed["labels"][0, text_positions[keep] == 0] = -100
    packed["position_ids"] = position_ids
    return packed


def unpack_positions(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-position values of a packed sequence's next-token predictions, shape (1, tokens - 1), put back in the padded
    layout (rows, length - 1): position t of a row predicts its token t + 1; positions that predict no token of the
    same row (padding, a row's last token) get 0, as TRL's fused LM head gives unlabelled positions."""
    keep = attention_mask.bool()
    index = keep.flatten().long().cumsum(0).view_as(keep) - 1  # each real token's place in the packed sequence
    predicts = keep[:, :-1] & keep[:, 1:]
    unpacked = values.new_zeros((keep.shape[0], keep.shape[1] - 1, *values.shape[2:]))
    unpacked[predicts] = values[0, index[:, :-1][predicts]]
    return unpacked


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


@contextmanager
def packed_forward(*models: Any) -> Iterator[None]:
    """Within the block, every forward of these models (PEFT allowed) that gets a padded batch runs it packed into one
    sequence (`pack_rows`), and the per-token figures of TRL's fused LM head (`log_probs`, `mean_logits`, ...) come back
    in the padded layout (`unpack_positions`): the caller (TRL's DPO loss) sees the outputs of the padded batch."""
    handles, masks = [], []

    def pack(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        if kwargs.get("attention_mask") is None:
            masks.append(None)
            return None
        masks.append(kwargs["attention_mask"])
        return args, pack_rows(module, kwargs)

    def unpack(module: Any, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        mask = masks.pop()
        if mask is None:
            return output
        predictions = int(mask.sum()) - 1
        for key, value in output.items():  # log_probs and the fused LM head's other per-token figures
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == (1, predictions):
                output[key] = unpack_positions(value, mask)
        return output

    for model in models:
        if model is None:
            continue
        handles.append(model.register_forward_pre_hook(pack, with_kwargs=True))
        handles.append(model.register_forward_hook(unpack, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
