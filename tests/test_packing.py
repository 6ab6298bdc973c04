"""Token-budget packing (`max_tokens_per_batch`): rows packed first-fit-decreasing into sequences of at most the budget,
every row once per epoch and never split, the same per-row loss as the rows unpacked (SFT), and DPO's chosen and
rejected packed into one sequence with TRL's loss unchanged."""

import random

import pytest
import torch
from conftest import REPO_ROOT, trainer_for

from vlm_recipes.data.lengths import TokenCounter, dataset_token_lengths
from vlm_recipes.errors import RecipeError
from vlm_recipes.modeling.segment_attention import SEGMENT_SDPA, language_config, segment_sdpa_forward
from vlm_recipes.recipe import parse_recipe
from vlm_recipes.training.padding_free import unpack_positions
from vlm_recipes.training.sampling import TokenBudgetBatchSampler, first_fit_decreasing, token_budget_sampler


# ---------------------------------------------------------------------------------------------------------------------
# The packing itself (no model)


def reference_first_fit_decreasing(lengths, capacity):
    """First-fit-decreasing as textbooks state it: longest first, each row into the first open bin with room."""
    bins, room = [], []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for position, free in enumerate(room):
            if lengths[index] <= free:
                bins[position].append(index)
                room[position] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(capacity - lengths[index])
    return bins


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_fit_decreasing_packs_every_row_once_within_the_budget(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(40, 3000) for _ in range(700)]
    bins = first_fit_decreasing(lengths, 4096)
    assert bins == reference_first_fit_decreasing(lengths, 4096)
    assert sorted(index for rows in bins for index in rows) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in rows) <= 4096 for rows in bins)
    # FFD's bound: at most 11/9 of the optimum (+ 6/9), and the optimum needs at least total / capacity bins
    assert len(bins) <= 11 / 9 * (sum(lengths) / 4096) + 1
    with pytest.raises(ValueError, match="more than the capacity"):
        first_fit_decreasing([10, 5000], 4096)


def test_token_budget_batches_per_epoch_and_per_process():
    rng = random.Random(0)
    lengths = [rng.randint(200, 1800) for _ in range(500)]
    sampler = TokenBudgetBatchSampler(lengths, 4096, seed=3)
    first, second = list(sampler), None
    sampler.set_epoch(1)
    second = list(sampler)
    assert len(first) == len(second) == len(sampler)  # the Trainer fixes an epoch's steps from the first
    assert sorted(map(sorted, first)) == sorted(map(sorted, second)) and first != second  # same bins, new order
    assert sum(lengths[i] for i in first[0]) == max(sum(lengths[i] for i in rows) for rows in first)  # fullest first
    sampler.set_epoch(0)
    assert list(sampler) == first  # seeded by epoch

    # Two processes: the batches dealt out in turn, as many for each, every row in the epoch
    shards = [list(TokenBudgetBatchSampler(lengths, 4096, processes=2, process_index=rank, seed=3)) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == -(-len(first) // 2)
    assert shards[0][: len(first) // 2] == first[0::2][: len(first) // 2]
    assert {i for shard in shards for rows in shard for i in rows} == set(range(len(lengths)))


def test_a_row_over_the_budget_stops_the_run_with_its_row_and_length():
    with pytest.raises(RecipeError, match=r"below the longest training row \(row 1 of the train split: 5,000 tokens"):
        token_budget_sampler([100, 5000, 300], 4096)


def test_unpacking_puts_each_prediction_back_at_its_padded_position():
    # Two rows, right and left padded: real tokens a0 a1 a2 | b0 b1; a packed prediction j predicts packed token j + 1
    for mask in (torch.tensor([[1, 1, 1], [1, 1, 0]]), torch.tensor([[1, 1, 1], [0, 1, 1]])):
        packed = torch.tensor([[10.0, 11.0, 12.0, 13.0]])  # predictions for a1, a2, (b0: crosses rows), b1
        unpacked = unpack_positions(packed, mask)
        assert unpacked[0].tolist() == [10.0, 11.0]
        b_row = unpacked[1].tolist()
        assert sorted(b_row) == [0.0, 13.0] and b_row[int(mask[1, 0] == 0)] == 13.0


# ---------------------------------------------------------------------------------------------------------------------
# Attention over a packed sequence without flash-attention: each row alone


class _Attention(torch.nn.Module):
    is_causal, num_key_value_groups = True, 2  # grouped-query attention, as the Qwen-VL language models have


@pytest.mark.parametrize("within_row", ["causal", "sliding window of 3"])
def test_packed_attention_runs_each_row_alone_and_equals_the_masked_sequence(within_row, monkeypatch):
    lengths = [5, 1, 7, 3]
    position_ids = torch.cat([torch.arange(length) for length in lengths])[None]
    total, heads, size = sum(lengths), 4, 8
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, heads, total, size, generator=generator)
    key, value = (torch.randn(1, heads // 2, total, size, generator=generator) for _ in range(2))
    # transformers' mask for a packed sequence: within-row pattern on the diagonal blocks, nothing across rows
    row = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    query_at, key_at = position_ids[0][:, None], position_ids[0][None, :]
    allowed = (row[:, None] == row[None, :]) & (key_at <= query_at)
    if within_row != "causal":
        allowed &= query_at - key_at < 3
    mask = allowed[None, None]
    dense = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1), attn_mask=mask
    ).transpose(1, 2)

    scored = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(q, k, *args, **kwargs):
        scored.append(q.shape[-2] * k.shape[-2])
        return sdpa(q, k, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    output, _ = segment_sdpa_forward(_Attention(), query, key, value, mask, position_ids=position_ids)
    torch.testing.assert_close(output, dense, rtol=0, atol=1e-5)
    assert sum(scored) == sum(length**2 for length in lengths)  # each row against itself: no cross-row work
    # A padded batch (no packed positions) runs transformers' sdpa as it is: one call over the whole sequence
    scored.clear()
    segment_sdpa_forward(_Attention(), query, key, value, mask)
    assert scored == [total**2]


# ---------------------------------------------------------------------------------------------------------------------
# SFT: the trainer's batches and loss


def test_sft_batches_fill_the_budget_and_score_rows_as_unpacked(tiny_qwen, chartqa_dir, tmp_path):
    trainer = trainer_for(tiny_qwen, chartqa_dir, tmp_path / "out", "--max_tokens_per_batch", "1200")
    assert trainer.packs_rows and trainer.token_budget is not None
    assert language_config(trainer.model)._attn_implementation == SEGMENT_SDPA  # sdpa on a CPU: one row at a time
    lengths = dataset_token_lengths(trainer.train_dataset, TokenCounter(trainer.processing_class))
    loader = trainer.get_train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader)
    # Every row once, each batch at most the budget in real tokens, and the counts the packing used are the real ones
    assert sum(int(batch["attention_mask"].shape[0]) for batch in batches) == len(trainer.train_dataset)
    real = [int(batch["attention_mask"].sum()) for batch in batches]
    assert max(real) <= 1200 and sum(real) == sum(lengths)
    assert max(int(batch["attention_mask"].shape[0]) for batch in batches) > 1  # several rows per sequence

    # The packed loss is the padded batch's, row for row (one token mean either way)
    batch = trainer._prepare_inputs(next(b for b in batches if b["attention_mask"].shape[0] > 1))
    packed = trainer.compute_loss(trainer.model, dict(batch))
    trainer.packs_rows = False
    padded = trainer.compute_loss(trainer.model, dict(batch))
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)


def test_sft_trains_with_a_token_budget_through_the_entry_point(tiny_qwen, chartqa_dir, tmp_path):
    from vlm_recipes.sft import SFTRecipe, train

    recipe = parse_recipe(
        SFTRecipe,
        [
            "--model_name_or_path", str(tiny_qwen), "--dataset_name", str(chartqa_dir), "--output_dir",
            str(tmp_path / "run"), "--use_peft", "true", "--use_cpu", "true", "--bf16", "false", "--dtype", "float32",
            "--report_to", "none", "--max_steps", "2", "--max_tokens_per_batch", "1500", "--save_strategy", "no", "--logging_steps", "1",
            "--eval_strategy", "no",
        ],
    )  # fmt: skip
    trainer = train(recipe)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 2 and losses and all(torch.isfinite(torch.tensor(losses)))


# ---------------------------------------------------------------------------------------------------------------------
# DPO: a pair's chosen and rejected in one sequence


@pytest.fixture(scope="module")
def preference_dir(tmp_path_factory):
    from vlm_recipes.data.synthetic import save_generated_dataset

    return save_generated_dataset(tmp_path_factory.mktemp("prefs"), "rlaif_v", train_rows=6, test_rows=2, seed=0)


def dpo_trainer(model_dir, data_dir, output_dir, *extra):
    from vlm_recipes.dpo import DPORecipe, build_trainer

    argv = [
        REPO_ROOT / "recipes" / "demo" / "dpo_lora.yaml", "--model_name_or_path", model_dir, "--dataset_name",
        data_dir, "--output_dir", output_dir, "--overwrite_output_dir", "true", "--dtype", "float32", "--bf16",
        "false", "--use_cpu", "true", "--dataset_test_split", "none", *extra,
    ]  # fmt: skip
    return build_trainer(parse_recipe(DPORecipe, [str(value) for value in argv]))


def test_dpo_packs_each_pair_whole_and_keeps_trl_loss(tiny_qwen, preference_dir, tmp_path):
    trainer = dpo_trainer(tiny_qwen, preference_dir, tmp_path / "dpo", "--max_tokens_per_batch", "300")
    assert trainer.packs_rows
    pair_lengths = dataset_token_lengths(
        trainer.train_dataset, TokenCounter(trainer.processing_class), all_conversations=True
    )
    batches = list(trainer.get_train_dataloader())
    pairs = sum(int(batch["input_ids"].shape[0]) // 2 for batch in batches)  # chosen rows, then rejected rows
    assert pairs == len(trainer.train_dataset)
    assert max(int(batch["attention_mask"].sum()) for batch in batches) <= 300 and len(batches) > 1
    assert sum(int(batch["attention_mask"].sum()) for batch in batches) == pytest.approx(sum(pair_lengths), rel=0.02)

    # A trained adapter (the policy differs from the reference), then TRL's loss with and without packing
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    batch = trainer._prepare_inputs(next(b for b in batches if b["input_ids"].shape[0] > 2))
    forwards = []
    hook = trainer.model.get_base_model().register_forward_pre_hook(  # what reaches the model inside the adapter
        lambda module, args, kwargs: forwards.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        packed = trainer.compute_loss(trainer.model, dict(batch))
    finally:
        hook.remove()
    assert forwards and all(shape[0] == 1 for shape in forwards)  # policy and reference each saw one sequence
    trainer.packs_rows = False
    padded = trainer.compute_loss(trainer.model, dict(batch))
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
    assert abs(float(packed) - 0.6931) > 1e-3  # not log 2: the policy's log-ratios are not zero
