"""No backward pass through a vision tower that does not train.

TRL's trainers, peft's k-bit preparation and transformers' activation checkpointing call `enable_input_require_grads`
when adapters train under gradient checkpointing: a forward hook on each input-embedding module makes its output
require gradients, so that checkpointed layers fed by frozen embeddings still pass gradients back to the adapters. A
VLM's vision tower is a model of its own whose input embedding is the patch embedding, so it gets the hook too: every
vision block then records its graph, is recomputed under checkpointing and back-propagated, although none of its
weights train. That was about 80% of the vision tower's time at Qwen2.5-VL width (benchmarks/real_width.py).

While no parameter of the vision tower requires a gradient, its forward runs with autograd off. Its output then
carries no gradient; the language model's input embeddings still do (the hook on them stays), and the image features
are merged into them, so the checkpointed decoder layers receive an input that requires gradients and pass gradients
to the adapters exactly as before. The check is made at each forward, so a vision tower that starts to train (staged
unfreezing, a LoRA adapter on it) gets its backward pass back. Nothing outside the vision tower needs a gradient from
it: its input is pixels, and a projector outside it (LLaVA's) has its own weights' gradients from its own input.

    keep_frozen_vision_out_of_backward(model, family)  # once, after the tuning strategy is applied
                                                       # (modeling.loading.load_for_training)
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from vlm_recipes.modeling.families import ModelFamily


# The hooks installed on a vision tower, kept on the module so a second call returns them instead of adding more.
HOOKS_ATTRIBUTE = "_vlm_recipes_frozen_vision_hooks"


def vision_tower(model: Any, family: ModelFamily) -> torch.nn.Module | None:
    """The family's vision tower inside `model` (bare or PEFT-wrapped), or None when the model has no such module."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return base.get_submodule(family.vision_tower)
    except AttributeError:
        return None


def keep_frozen_vision_out_of_backward(model: Any, family: ModelFamily) -> list[Any]:
    """Make the vision tower's forward run without autograd whenever none of its parameters requires a gradient.
    Returns the two hook handles (removing them restores transformers' behaviour); [] when the family's vision tower
    is not found."""
    tower = vision_tower(model, family)
    if tower is None:
        return []
    if hasattr(tower, HOOKS_ATTRIBUTE):
        return getattr(tower, HOOKS_ATTRIBUTE)
    saved = threading.local()  # grad mode is per thread (torch.nn.DataParallel runs replicas in threads)

    def before(module: torch.nn.Module, args: Any) -> None:
        stack = saved.__dict__.setdefault("grad_enabled", [])
        stack.append(torch.is_grad_enabled())
        if stack[-1] and not any(parameter.requires_grad for parameter in module.parameters()):
            torch.set_grad_enabled(False)

    def after(module: torch.nn.Module, args: Any, output: Any) -> None:
        torch.set_grad_enabled(saved.grad_enabled.pop())

    handles = [
        tower.register_forward_pre_hook(before),
        tower.register_forward_hook(after, always_call=True),  # restore grad mode when the forward raises, too
    ]
    setattr(tower, HOOKS_ATTRIBUTE, handles)
    return handles


@contextmanager
def frozen_vision_backward(model: Any, family: ModelFamily) -> Iterator[None]:
    """Inside: the hooks off, so a frozen tower records its graph as it does in TRL's own trainer (what the fix is
    compared with, in the tests and `benchmarks/real_width.py`'s plain TRL figure); they are back on after."""
    tower = vision_tower(model, family)
    installed = tower is not None and hasattr(tower, HOOKS_ATTRIBUTE)
    if installed:
        for handle in getattr(tower, HOOKS_ATTRIBUTE):
            handle.remove()
        delattr(tower, HOOKS_ATTRIBUTE)
    try:
        yield
    finally:
        if installed:
            keep_frozen_vision_out_of_backward(model, family)
