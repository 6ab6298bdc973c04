"""Speed features: length-grouped batching, the LM head at labelled positions only, padding-free batches.

Each must leave what is learned unchanged (same rows, same loss, same gradients); the figures are `make bench`'s.
"""

import random

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from conftest import trainer_for
from PIL import Image
from torch.utils.data import BatchSampler

from vlm_recipes.data.lengths import TokenCounter, padding_share, random_batching_padding_share
from vlm_recipes.errors import RecipeError
from vlm_recipes.modeling.families import FAMILIES
from vlm_recipes.modeling.segment_attention import SEGMENT_SDPA, attend_per_segment, language_config
from vlm_recipes.recipe import parse_recipe
from vlm_recipes.sft import SFTRecipe
from vlm_recipes.training.padding_free import check_padding_free, pack_rows
from vlm_recipes.training.run import resolve_model
from vlm_recipes.training.sampling import LengthGroupedSampler
from vlm_recipes.training.speed import take_padding_free


# ---------------------------------------------------------------------------------------------------------------------
# Length-grouped batching


@pytest.fixture(scope="module")
def chartqa_like_lengths(tiny_qwen):
    """True token counts of 2,000 ChartQA-like rows: a short text and one image of a realistic size (300-1600 x
    200-1200 px), by the real Qwen2.5-VL resize rule at the checkpoint's max_pixels (12,845,056)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_qwen, max_pixels=12845056)
    counter = TokenCounter(processor)
    rng = random.Random(0)
    return [
        rng.randint(30, 70) + counter.image_tokens(rng.randint(300, 1600), rng.randint(200, 1200)) for _ in range(2000)
    ]


def test_grouping_by_true_length_leaves_almost_no_padding(chartqa_like_lengths):
    lengths = chartqa_like_lengths
    sampler = LengthGroupedSampler(lengths, per_device_batch_size=8, seed=0)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))  # every row once per epoch
    assert padding_share(lengths, 8, order) <= 0.03
    assert random_batching_padding_share(lengths, 8) >= 0.3  # what random batching carries on the same rows
    # The longest batch comes first (an out-of-memory error shows at step 1); the order is random at the large scale.
    assert max(lengths[i] for i in order[:8]) == max(lengths)
    assert order != sorted(order, key=lengths.__getitem__, reverse=True)


def test_grouped_order_is_seeded_per_epoch(chartqa_like_lengths):
    first, again = (
        LengthGroupedSampler(chartqa_like_lengths, 8, seed=3),
        LengthGroupedSampler(chartqa_like_lengths, 8, seed=3),
    )
    assert list(first) == list(again)  # every process draws the same order
    again.set_epoch(1)
    assert list(again) != list(first) and sorted(again) == sorted(first)


def test_grouping_under_ddp_gives_each_step_similar_rows_and_covers_every_row(chartqa_like_lengths):
    lengths = chartqa_like_lengths[:1003]  # not a multiple of the global batch
    sampler = LengthGroupedSampler(lengths, per_device_batch_size=4, processes=2, seed=0)
    shards = [
        list(BatchSamplerShard(BatchSampler(sampler, 4, drop_last=False), num_processes=2, process_index=rank))
        for rank in range(2)
    ]  # as accelerate shards the dataloader of each process
    seen = [index for shard in shards for batch in shard for index in batch]
    assert set(seen) == set(range(len(lengths)))
    # Step by step, the two processes' batches come from one sorted global batch: no process waits on a much longer one.
    for batch_0, batch_1 in list(zip(*shards))[:-1]:
        assert min(lengths[i] for i in batch_0) >= max(lengths[i] for i in batch_1)
    per_process_padding = [padding_share(lengths, 4, [i for batch in shard for i in batch]) for shard in shards]
    assert max(per_process_padding) <= 0.03


# ---------------------------------------------------------------------------------------------------------------------
# The LM head at labelled positions only


class RowRecorder:
    """Stands in for TRL's chunked log-prob function and records how many positions reach the LM head."""

    rows: list[int] = []

    def __init__(self, original):
        self.original = original

    def apply(self, hidden, *args):
        RowRecorder.rows.append(hidden.shape[0])
        return self.original.apply(hidden, *args)


def _lora_gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_labelled_positions_only_gives_the_full_loss_and_gradients(tiny_qwen, chartqa_dir, tmp_path, monkeypatch):
    import trl.trainer.utils as trl_utils

    trainer = trainer_for(tiny_qwen, chartqa_dir, tmp_path / "out", "--per_device_train_batch_size", "4")
    assert trainer.speed.loss_on_labels_only  # on by default
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model = trainer.model
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", RowRecorder(trl_utils._ChunkedLogProbFunction))

    # The model's own loss over the full logits: the reference.
    full = model(**batch).loss
    full.backward()
    expected = _lora_gradients(model)
    model.zero_grad()

    RowRecorder.rows.clear()
    compact = trainer.compute_loss(model, dict(batch))
    compact.backward()
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert RowRecorder.rows == [labelled]  # only the answer positions reach the LM head
    torch.testing.assert_close(compact, full, rtol=1e-5, atol=1e-5)
    got = _lora_gradients(model)
    assert got.keys() == expected.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)

    # Without the feature, TRL scores every position on a CPU.
    trainer.speed.loss_on_labels_only = False
    RowRecorder.rows.clear()
    trainer.compute_loss(model, dict(batch))
    assert RowRecorder.rows == [batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)]


# ---------------------------------------------------------------------------------------------------------------------
# Padding-free batches


def _examples():
    def example(width, height, question, answer):
        image = Image.new("RGB", (width, height), (width % 255, 40, 120))
        return {
            "images": [image],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ],
        }

    return [
        example(120, 90, "What is the value?", "42"),
        example(64, 200, "Which bar is highest in the chart?", "the red one"),
        example(300, 100, "Is it rising?", "yes"),
    ]


def _answer_log_probs(model, batch):
    """Log-probability of every labelled token, in order (rows one after the other)."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    log_probs = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return log_probs[labels != -100]


PACKING_FAMILIES = [name for name, family in FAMILIES.items() if family.padding_free_refusal is None]
MULTIMODAL_ROPE = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"}


def test_packing_is_offered_where_it_was_measured_exact():
    # The families below each pass the per-row test next; the others' rows would mix (refused, tested further down).
    assert set(PACKING_FAMILIES) == MULTIMODAL_ROPE | {"llava", "llava_next", "smolvlm", "gemma4"}


@pytest.mark.parametrize("family", PACKING_FAMILIES)
def test_packed_rows_score_as_the_rows_run_alone(family, tiny_models):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from vlm_recipes.modeling.chat_templates import read_template

    folder = tiny_models(family)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    template = FAMILIES[family].training_template
    collator = DataCollatorForVisionLanguageModeling(
        processor, assistant_only_loss=True, chat_template=read_template(template) if template else None
    )
    examples = _examples()
    batch = collator([dict(example) for example in examples])
    packed = pack_rows(model, batch)
    # The guard conditions transformers needs to keep packed rows apart: no mask, position ids that restart per row
    # (four rows for multimodal RoPE: the text positions, then the row's own RoPE ids).
    assert "attention_mask" not in packed
    assert packed["position_ids"].shape[:-1] == ((4, 1) if family in MULTIMODAL_ROPE else (1,))
    assert packed["input_ids"].shape == (1, int(batch["attention_mask"].sum()))
    with torch.no_grad():
        alone = torch.cat([_answer_log_probs(model, collator([dict(example)])) for example in examples])
        torch.testing.assert_close(_answer_log_probs(model, packed), alone, rtol=0, atol=1e-5)
        # sdpa without flash-attention (a CPU): the trainers switch to attending one packed row at a time
        assert attend_per_segment(model) and language_config(model)._attn_implementation == SEGMENT_SDPA
        torch.testing.assert_close(_answer_log_probs(model, packed), alone, rtol=0, atol=1e-5)
        if family in MULTIMODAL_ROPE:
            # Why the text row matters: with the three RoPE rows alone, packed rows attend to each other.
            leaky = {**packed, "position_ids": packed["position_ids"][1:]}
            assert not torch.allclose(_answer_log_probs(model, leaky), alone, atol=1e-2)
        else:
            # Why the restarting positions matter: numbered straight through, the rows attend to each other.
            leaky = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1])[None]}
            assert not torch.allclose(_answer_log_probs(model, leaky), alone, atol=1e-2)


def test_padding_free_trainer_loss_equals_the_padded_loss(tiny_qwen, chartqa_dir, tmp_path):
    trainer = trainer_for(
        tiny_qwen, chartqa_dir, tmp_path / "out", "--per_device_train_batch_size", "4", "--padding_free", "true"
    )
    assert trainer.packs_rows and not trainer.args.padding_free  # ours packs; TRL's (refused for vision) is off
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert (batch["attention_mask"] == 0).any()  # the padded batch has padding to remove
    packed_loss = trainer.compute_loss(trainer.model, dict(batch))
    trainer.packs_rows = False
    padded_loss = trainer.compute_loss(trainer.model, dict(batch))
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["gemma3", "qwen3_5"])
@pytest.mark.parametrize("switch", [("--padding_free", "true"), ("--max_tokens_per_batch", "4096")])
def test_packing_is_refused_where_rows_would_mix(family, switch, tiny_models, tmp_path):
    recipe = parse_recipe(
        SFTRecipe, ["--model_name_or_path", str(tiny_models(family)), "--output_dir", str(tmp_path), *switch]
    )
    with pytest.raises(
        RecipeError, match=rf"padding_free: true and max_tokens_per_batch cannot be used with {family}"
    ):
        take_padding_free(recipe.training, resolve_model(recipe).family, recipe.speed)
    for name in PACKING_FAMILIES:
        check_padding_free(FAMILIES[name])


def test_flash_attention_is_chosen_where_it_is_installed_and_can_run(monkeypatch):
    from vlm_recipes.configs import ModelArguments
    from vlm_recipes.modeling import base_model as loading

    monkeypatch.setattr(loading, "_installed", lambda module: module == "flash_attn")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loading.attention_implementation(ModelArguments(dtype="bfloat16")) == "flash_attention_2"
    assert loading.attention_implementation(ModelArguments(dtype="float32")) is None  # flash-attention is 16-bit only
    assert loading.attention_implementation(ModelArguments(attn_implementation="sdpa")) == "sdpa"  # the recipe wins
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loading.attention_implementation(ModelArguments(dtype="bfloat16")) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loading, "_installed", lambda module: False)
    assert loading.attention_implementation(ModelArguments(dtype="bfloat16")) is None


def test_speed_defaults_group_by_length_unless_the_recipe_says_otherwise(tmp_path, monkeypatch):
    from vlm_recipes.training.speed import apply_speed_defaults

    def defaults_applied(*extra, gpus=0, cores=2):
        recipe = parse_recipe(SFTRecipe, ["--output_dir", str(tmp_path), *extra])
        with monkeypatch.context() as patch:  # the machine as apply_speed_defaults sees it
            patch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
            patch.setattr(torch.cuda, "device_count", lambda: gpus)
            patch.setattr("os.cpu_count", lambda: cores)
            apply_speed_defaults(recipe)
        return recipe.training

    training = defaults_applied()
    assert training.train_sampling_strategy == "group_by_length"
    assert training.dataloader_num_workers == 0  # on CPUs, workers would take the training's cores
    training = defaults_applied("--train_sampling_strategy", "random", "--dataloader_num_workers", "1")
    assert training.train_sampling_strategy == "random" and training.dataloader_num_workers == 1
    for cores, workers in ((32, 4), (6, 2), (2, 0)):  # up to 4 per GPU, leaving each training process a core
        assert defaults_applied(gpus=2, cores=cores).dataloader_num_workers == workers, cores
