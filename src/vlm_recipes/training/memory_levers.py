"""Memory levers a recipe can pull, each checked where it cannot work and accounted for by the preflight's estimate
(`modeling.memory`):

- `activation_offloading` (TRL's field): activations kept for the backward pass move to CPU memory. It needs a GPU
  (TRL's offloading builds device streams; on a CPU the activations are in CPU memory already): refused without one.
- `use_liger_kernel` (transformers' field): Liger's layer kernels (RMSNorm, SwiGLU, RoPE) patched into the model; TRL
  keeps its own fused LM head. Refused clearly where it cannot work: liger-kernel not installed (the `liger` extra),
  a model liger-kernel cannot patch under the installed transformers (checked by patching a weightless copy: 0.8.5
  fails for the Qwen-VL families under transformers 5.24), or no CUDA GPU (its kernels are Triton GPU kernels).
- `vision_gradient_checkpointing`: the vision tower's blocks checkpointed or not, apart from the language model
  (ms-swift's `vit_gradient_checkpointing`); set when training starts, after the Trainer enabled checkpointing.
- `vision_chunk_images`: a batch's images encoded through the vision tower a few at a time (Qwen-VL families: each
  image's patch rows and `grid_thw` row are independent of the others, so the features are the same).
"""

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import TrainerCallback

from vlm_recipes.compat import installed_version, set_layer_checkpointing
from vlm_recipes.configs import SpeedArguments
from vlm_recipes.errors import RecipeError
from vlm_recipes.modeling.families import ModelFamily
from vlm_recipes.modeling.frozen_vision import vision_tower


def check_memory_levers(args: Any, model: Any, family: ModelFamily, speed: SpeedArguments) -> None:
    """Stop at the start when a lever the recipe pulls cannot work here (before TRL's `__init__`)."""
    if getattr(args, "activation_offloading", False) and not torch.cuda.is_available():
        raise RecipeError(
            "activation_offloading: true moves activations from GPU memory to CPU memory, and this run has no GPU "
            "(on a CPU they are in CPU memory already). Remove `activation_offloading` from the recipe."
        )
    if getattr(args, "use_liger_kernel", False):
        check_liger_kernel(model)
    if speed.vision_chunk_images is not None:
        if speed.vision_chunk_images < 1:
            raise RecipeError(f"vision_chunk_images must be at least 1, not {speed.vision_chunk_images}.")
        if not _takes_image_grid(vision_tower(model, family)):
            raise RecipeError(
                f"vision_chunk_images works for the Qwen-VL families (images as patch rows with `grid_thw`), not "
                f"{family.name}. Remove it from the recipe."
            )


def check_liger_kernel(model: Any) -> None:
    """`use_liger_kernel: true` where Liger can patch this model and run: installed, able to patch the model's class
    under the installed transformers (tried on a weightless copy of the model), and a CUDA GPU."""
    if importlib.util.find_spec("liger_kernel") is None:
        raise RecipeError(
            "use_liger_kernel: true needs liger-kernel: pip install 'vlm-recipes[liger]' (or pip install "
            "liger-kernel), on a machine with a CUDA GPU. Or remove `use_liger_kernel` from the recipe."
        )
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText
    from transformers.integrations.liger import apply_liger_kernel

    config = _base(model).config
    try:
        with init_empty_weights(), _transformers_modules_restored():
            weightless = AutoModelForImageTextToText.from_config(config)
            apply_liger_kernel(weightless, {"fused_linear_cross_entropy": False})  # TRL keeps its own fused LM head
    except Exception as error:  # whatever Liger raises for a class it cannot patch
        raise RecipeError(
            f"use_liger_kernel: true: liger-kernel {installed_version('liger-kernel')} cannot patch "
            f"{config.model_type} under transformers {installed_version('transformers')} ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:160]}). Remove `use_liger_kernel` from the recipe."
        ) from None
    if not torch.cuda.is_available():
        raise RecipeError(
            "use_liger_kernel: true: Liger's kernels are Triton GPU kernels and need a CUDA GPU; this run has none. "
            "Remove `use_liger_kernel` from the recipe for CPU runs."
        )


@contextmanager
def _transformers_modules_restored() -> Iterator[None]:
    """Liger patches the modeling modules themselves (their norm and MLP classes, rotary function, class methods), so
    every model built later in the process would use its Triton kernels: a trial patch is undone here, attribute by
    attribute, in every loaded `transformers.models` module and the classes defined in it."""
    modules = [m for name, m in list(sys.modules.items()) if name.startswith("transformers.models.") and m is not None]
    saved = []
    for module in modules:
        saved.append((module, dict(vars(module))))
        for value in list(vars(module).values()):
            if isinstance(value, type) and value.__module__ == module.__name__:
                saved.append((value, dict(vars(value))))
    try:
        yield
    finally:
        for owner, attributes in saved:
            for key, value in attributes.items():
                if vars(owner).get(key) is not value:
                    setattr(owner, key, value)


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _takes_image_grid(tower: Any) -> bool:
    import inspect

    return tower is not None and "grid_thw" in inspect.signature(tower.forward).parameters


# ---------------------------------------------------------------------------------------------------------------------
# Gradient checkpointing inside the vision tower


def set_vision_checkpointing(model: Any, family: ModelFamily, enabled: bool) -> int:
    """Checkpoint the vision tower's blocks (or not), whatever the language model does; returns the blocks set."""
    layers = [module for module in vision_tower(model, family).modules() if _is_layer(module)]
    for layer in layers:
        set_layer_checkpointing(layer, enabled)
    return len(layers)


def _is_layer(module: Any) -> bool:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return isinstance(module, GradientCheckpointingLayer)


class VisionCheckpointing(TrainerCallback):
    """`vision_gradient_checkpointing` set on the vision tower's blocks when training starts (the Trainer enables
    checkpointing for every layer at the start of `train()`, so an earlier setting would be overwritten)."""

    def __init__(self, family: ModelFamily, enabled: bool):
        self.family, self.enabled = family, enabled

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        from accelerate.utils import extract_model_from_parallel

        set_vision_checkpointing(extract_model_from_parallel(model), self.family, self.enabled)


# ---------------------------------------------------------------------------------------------------------------------
# Encoding a batch's images in chunks


def encode_images_in_chunks(model: Any, family: ModelFamily, images_per_chunk: int) -> None:
    """The vision tower's forward, from now on, runs over at most `images_per_chunk` images at a time (Qwen-VL: the
    patch rows of each image, by its `grid_thw` row) and concatenates the outputs, field by field."""
    tower = vision_tower(model, family)
    forward = tower.forward

    def chunked_forward(hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs: Any) -> Any:
        if grid_thw.shape[0] <= images_per_chunk:
            return forward(hidden_states, grid_thw=grid_thw, **kwargs)
        rows = grid_thw.prod(dim=-1).tolist()
        outputs, start = [], 0
        for first in range(0, len(rows), images_per_chunk):
            count = sum(rows[first : first + images_per_chunk])
            outputs.append(
                forward(
                    hidden_states[start : start + count], grid_thw=grid_thw[first : first + images_per_chunk], **kwargs
                )
            )
            start += count
        return _concatenated(outputs)

    tower.forward = chunked_forward


def _concatenated(outputs: list[Any]) -> Any:
    """Outputs of several chunks as one: tensors joined along the first dimension, lists of tensors element by
    element (Qwen3-VL's DeepStack features), None kept."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, (list, tuple)):
        return type(first)(_concatenated([output[index] for output in outputs]) for index in range(len(first)))
    if first is None:
        return None
    if hasattr(first, "keys"):  # a ModelOutput
        joined = type(first)(**{key: _concatenated([output[key] for output in outputs]) for key in first.keys()})
        return joined
    raise TypeError(f"cannot join vision tower outputs of type {type(first).__name__}")
