"""A frozen vision tower runs without autograd (`vlm_recipes.modeling.frozen_vision`, installed by
`load_for_training`): the loss and every trained gradient are what they were with transformers' backward pass through
the tower, with and without gradient checkpointing, and the tower's output carries a gradient exactly when one of its
weights trains."""

import pytest
import torch
from conftest import checkpoint_as_trainer, trainer_for
from transformers.modeling_layers import GradientCheckpointingLayer

from vlm_recipes.modeling.frozen_vision import (
    HOOKS_ATTRIBUTE,
    frozen_vision_backward,
    keep_frozen_vision_out_of_backward,
    vision_tower,
)


def tower_output_and_step(trainer, batch):
    """(loss, trained gradients, whether the vision tower's output required a gradient) of one forward + backward."""
    tower = vision_tower(trainer.model, trainer.family)
    seen = []
    hook = tower.register_forward_hook(
        lambda module, args, output: seen.append(
            (output.pooler_output if hasattr(output, "pooler_output") else output[0]).requires_grad
        )
    )
    trainer.model.zero_grad()
    try:
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
    finally:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert seen and len(set(seen)) == 1, seen  # the tower ran, the same way for every call
    return loss.detach(), grads, seen[0]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_frozen_vision_tower_runs_no_backward_and_changes_nothing_learned(family, tiny_models, chartqa_dir, tmp_path):
    small_images = ["--image_max_pixels", str(64 * 28 * 28)] if family == "qwen2_5_vl" else []  # quick steps
    trainer = trainer_for(
        tiny_models(family), chartqa_dir, tmp_path / "out", "--per_device_train_batch_size", "2",
        "--gradient_checkpointing", "true", *small_images,
    )  # fmt: skip
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert not any(p.requires_grad for p in vision_tower(trainer.model, trainer.family).parameters())
    layers = [m for m in trainer.model.modules() if isinstance(m, GradientCheckpointingLayer)]
    checkpoint_as_trainer(trainer)

    for checkpointing in (True, False):
        if not checkpointing:  # transformers' input hooks stay: the tower's output would still require a gradient
            trainer.model.get_base_model().activation_checkpointing_disable()
        assert all(layer.gradient_checkpointing == checkpointing for layer in layers)
        tower = vision_tower(trainer.model, trainer.family)
        installed = getattr(tower, HOOKS_ATTRIBUTE)  # by `load_for_training`; a second call adds none
        assert installed and keep_frozen_vision_out_of_backward(trainer.model, trainer.family) is installed
        fixed_loss, fixed_grads, fixed_output_grad = tower_output_and_step(trainer, batch)
        with frozen_vision_backward(trainer.model, trainer.family):  # TRL's behaviour
            loss, grads, output_grad = tower_output_and_step(trainer, batch)
        assert hasattr(tower, HOOKS_ATTRIBUTE)  # back on

        assert not fixed_output_grad  # no graph through the frozen tower
        assert output_grad  # transformers' hook on the tower's input embedding (patch embedding) gave it one
        torch.testing.assert_close(fixed_loss, loss, rtol=0, atol=0)
        assert fixed_grads.keys() == grads.keys() and any("lora_" in name for name in grads)
        for name in grads:
            assert fixed_grads[name] is not None, name
            torch.testing.assert_close(fixed_grads[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_a_vision_tower_that_trains_keeps_its_backward(tiny_qwen, chartqa_dir, tmp_path):
    trainer = trainer_for(
        tiny_qwen, chartqa_dir, tmp_path / "out", "--tuning_strategy", "lora_llm_full_vit",
        "--per_device_train_batch_size", "2", "--gradient_checkpointing", "true", "--image_max_pixels", str(64 * 28 * 28),
    )  # fmt: skip
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    _, grads, output_grad = tower_output_and_step(trainer, batch)
    assert output_grad
    trained = [
        name for name, grad in grads.items() if ".visual." in name and grad is not None and grad.abs().sum() > 0
    ]
    assert any(".blocks." in name for name in trained)  # the blocks' copies of `modules_to_save` get gradients

    # Frozen mid-run (the check is made at each forward): the tower's output stops carrying a gradient
    tower = vision_tower(trainer.model, trainer.family)
    for parameter in tower.parameters():
        parameter.requires_grad_(False)
    _, _, output_grad = tower_output_and_step(trainer, batch)
    assert not output_grad
    assert torch.is_grad_enabled()  # the tower's forward restores the grad mode it found
