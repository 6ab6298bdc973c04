"""Memory levers (`vlm_recipes.training.memory_levers`): what changes memory changes nothing learned (same loss and
gradients with and without the vision tower's checkpointing and with images encoded in chunks), levers that cannot
work here are refused with a clear message, and the preflight's estimate moves the way each lever moves memory."""

import pytest
import torch
from conftest import checkpoint_as_trainer, trainer_for
from test_memory import estimate, qwen2_5_vl_7b_config
from transformers.modeling_layers import GradientCheckpointingLayer

from vlm_recipes.configs import ModelArguments, SpeedArguments, TuningArguments
from vlm_recipes.errors import RecipeError
from vlm_recipes.modeling.families import FAMILIES
from vlm_recipes.modeling.frozen_vision import vision_tower
from vlm_recipes.training.memory_levers import (
    VisionCheckpointing,
    check_liger_kernel,
    encode_images_in_chunks,
    set_vision_checkpointing,
)


SMALL_IMAGES = 64 * 28 * 28  # 64 image tokens per image: quick steps


def loss_and_gradients(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


def assert_same(first, second):
    torch.testing.assert_close(first[0], second[0], rtol=0, atol=1e-6)
    assert first[1].keys() == second[1].keys() and first[1]
    for name in first[1]:
        torch.testing.assert_close(first[1][name], second[1][name], rtol=1e-4, atol=1e-6)


def test_vision_checkpointing_changes_no_loss_or_gradient(tiny_qwen, chartqa_dir, tmp_path):
    trainer = trainer_for(
        tiny_qwen, chartqa_dir, tmp_path / "out", "--tuning_strategy", "lora_llm_full_vit",
        "--per_device_train_batch_size", "2", "--gradient_checkpointing", "true", "--vision_gradient_checkpointing",
        "false", "--image_max_pixels", str(SMALL_IMAGES),
    )  # fmt: skip
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    family = FAMILIES["qwen2_5_vl"]
    # As at the start of `train`: every layer checkpointed, then the callback sets the vision tower's blocks apart
    checkpoint_as_trainer(trainer)
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, VisionCheckpointing))
    callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=trainer.model)
    # the tower trains as PEFT's `modules_to_save` copy: its blocks and the frozen original's
    blocks = [m for m in vision_tower(trainer.model, family).modules() if isinstance(m, GradientCheckpointingLayer)]
    layers = trainer.model.get_base_model().model.language_model.layers
    depth = trainer.model.get_base_model().config.vision_config.depth
    assert len(blocks) == 2 * depth and not any(block.gradient_checkpointing for block in blocks)
    assert all(layer.gradient_checkpointing for layer in layers)  # the language model keeps its own setting
    trained_block = vision_tower(trainer.model, family).modules_to_save["default"].blocks[0]
    calls = []
    # Before a module inside the block: the checkpoint wraps the block's `forward`, so the block's own hooks run once,
    # and the recomputation stops early, once the last tensor the backward needs (inside the MLP) is computed again
    trained_block.mlp.register_forward_pre_hook(lambda *args: calls.append(1))
    kept = loss_and_gradients(trainer, batch)
    assert len(calls) == 1  # kept: one forward

    set_vision_checkpointing(trainer.model, family, True)
    assert all(block.gradient_checkpointing for block in blocks)
    recomputed = loss_and_gradients(trainer, batch)
    assert len(calls) == 3  # checkpointed: the forward, and again in the backward pass
    assert_same(kept, recomputed)
    assert any(".visual.modules_to_save.default.blocks." in name for name in kept[1])  # the tower trains


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_images_encoded_in_chunks_give_the_same_features(family, tiny_models):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_models(family), dtype=torch.float32)
    tower = vision_tower(model, FAMILIES[family])
    patch = tower.config.patch_size * tower.config.patch_size * tower.config.in_channels
    patch *= tower.config.temporal_patch_size
    grid = torch.tensor([[1, 4, 6], [1, 2, 2], [1, 6, 4]])  # three images of different sizes
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(int(grid.prod(dim=1).sum()), patch, generator=generator, requires_grad=True)
    whole = tower(pixels, grid_thw=grid)
    encode_images_in_chunks(model, FAMILIES[family], 2)
    calls = []
    hook = tower.blocks[0].register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    chunked = tower(pixels, grid_thw=grid)
    hook.remove()
    assert calls == [24 + 4, 24]  # two images, then the third
    for key in whole.keys():
        first, second = whole[key], chunked[key]
        for a, b in zip(
            first if isinstance(first, list) else [first], second if isinstance(second, list) else [second]
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    grads = [torch.autograd.grad(out.pooler_output.sum(), pixels)[0] for out in (whole, chunked)]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-5)


def test_levers_that_cannot_work_here_are_refused(tiny_models, tiny_qwen, chartqa_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText

    with pytest.raises(RecipeError, match="activation_offloading: true moves activations from GPU memory"):
        trainer_for(tiny_qwen, chartqa_dir, tmp_path / "a", "--activation_offloading", "true")
    with pytest.raises(RecipeError, match="vision_chunk_images works for the Qwen-VL families"):
        trainer_for(tiny_models("llava"), chartqa_dir, tmp_path / "b", "--vision_chunk_images", "2")

    qwen = AutoModelForImageTextToText.from_pretrained(tiny_qwen)
    llava = AutoModelForImageTextToText.from_pretrained(tiny_models("llava"))
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is not None:
        # liger-kernel 0.8.5 cannot patch the Qwen-VL classes of transformers 5.24; elsewhere it needs a CUDA GPU
        with pytest.raises(RecipeError, match="cannot patch qwen2_5_vl under transformers"):
            check_liger_kernel(qwen)
        from transformers.models.llama import modeling_llama

        norm, mlp = modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP
        with pytest.raises(RecipeError, match="Triton GPU kernels and need a CUDA GPU"):
            check_liger_kernel(llava)
        # the trial patch is undone: models built later in the process keep transformers' own layers
        assert (modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP) == (norm, mlp)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(RecipeError, match=r"needs liger-kernel: pip install 'vlm-recipes\[liger\]'"):
        check_liger_kernel(llava)


def test_the_estimate_moves_with_each_lever():
    config = (
        qwen2_5_vl_7b_config()
    )  # 7B's width at 4 layers and 4 vision blocks: the meta model builds in a fraction of a second
    config.text_config.num_hidden_layers = config.vision_config.depth = layers = 4
    config.vision_config.fullatt_block_indexes = [3]
    lora = ModelArguments(use_peft=True)
    vit = TuningArguments(tuning_strategy="lora_llm_full_vit")
    base = estimate(config, lora, vit, per_device_train_batch_size=4, gradient_checkpointing=True)

    def with_speed(**fields):
        from trl import SFTConfig

        from vlm_recipes.modeling.memory import estimate_peak_memory
        from vlm_recipes.modeling.setup import setup_for_config

        training = {"per_device_train_batch_size": 4, "gradient_checkpointing": True}
        training.update({k: fields.pop(k) for k in ("activation_offloading", "use_liger_kernel") if k in fields})
        args = SFTConfig(output_dir="unused", use_cpu=True, bf16=False, **training)
        setup = setup_for_config(config, lora, vit, 1e-4)
        return estimate_peak_memory(setup, args, 1500, 1200, speed=SpeedArguments(**fields))

    # Token-budget packing: one sequence of the budget instead of 4 rows padded to the longest
    packed = with_speed(max_tokens_per_batch=4096)
    assert packed.tokens == 4096 < base.tokens == 6000 and packed.peak(True) < base.peak(True)
    # Offloading: the stored activations of about two layers on the GPU instead of every layer's
    offloaded = with_speed(activation_offloading=True)
    assert offloaded.activations_checkpointed < base.activations_checkpointed
    assert offloaded.activations_full == pytest.approx(base.activations_full * 2 / layers, rel=0.01)
    assert any("CPU memory" in note for note in offloaded.notes)
    # The vision tower checkpointed apart from the language model
    vision_kept = with_speed(vision_gradient_checkpointing=False)
    vision_recomputed = with_speed(vision_gradient_checkpointing=True)
    assert vision_recomputed.activations_checkpointed == base.activations_checkpointed
    assert vision_kept.activations_checkpointed > base.activations_checkpointed
    # Chunked encoding: fewer patches in the tower at once
    chunked = with_speed(vision_chunk_images=1)
    assert 0 < chunked.vision_encoding < base.vision_encoding and chunked.peak(True) < base.peak(True)
    # Liger: named, not counted
    assert with_speed(use_liger_kernel=True).peak(True) == base.peak(True)
