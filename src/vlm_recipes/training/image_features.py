"""Image features computed once per DPO batch, for the policy and the reference forward alike; and once per GRPO
generation batch (`ImageFeatureCache`, at the end of this module).

TRL's vision DPO batch holds 2B rows, [chosen rows; rejected rows], whose images are the B rows' images repeated
(`DataCollatorForVisionPreference`), and TRL runs it through the model twice: the policy, then the reference (the
adapter disabled, or TRL's frozen "ref" adapter). So each image goes through the vision tower four times. While the
vision tower and projector are frozen and carry no adapter, those four encodings are equal: they are computed once,
without gradient, and handed to both forwards as `mm_encoder_outputs`, which every family's forward takes in place of
`pixel_values` (it then uses what its own `get_image_features` would have returned: `pooler_output`, and Qwen3-VL's
`deepstack_features`).

    blocker = image_feature_reuse_blocker(model, family)  # once, on the model compute_loss gets (after wrapping)
    if blocker is None:
        inputs = with_image_features(model, family, inputs)  # each batch, before TRL's compute_loss

Qwen-VL families (flat patches + `image_grid_thw`) encode only the first half of the images when the second half
repeats it exactly, and repeat the features: one encoding per image. Other families encode the batch's images once
(policy and reference share them: two encodings per image instead of four).
"""

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from vlm_recipes.modeling.families import ModelFamily


# Families whose processor gives one flat tensor of patches for all images plus one `image_grid_thw` row per image,
# so the first half of the images is a slice of patch rows.
FLAT_PATCH_FAMILIES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5"})
VISION_PARTS = ("vision_tower", "projector")
# What the families' forwards read from `mm_encoder_outputs["image"]`; the rest (the tower's hidden states) is dropped,
# so it is not held through the backward pass.
FEATURE_FIELDS = ("pooler_output", "deepstack_features")


# ---------------------------------------------------------------------------------------------------------------------
# The model inside its wrappers


def unwrap_model(model: Any) -> Any:
    """The transformers model inside DDP / DeepSpeed and PEFT wrappers (adapter layers stay in place)."""
    model = _without_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _without_parallel(model: Any) -> Any:
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


# ---------------------------------------------------------------------------------------------------------------------
# Whether reuse is exact


def image_feature_reuse_blocker(model: Any, family: ModelFamily) -> str | None:
    """None when computing the image features once per batch gives exactly what the forwards would compute; else why
    not. `model` as the trainer holds it: PEFT-, DDP- or DeepSpeed-wrapped or bare."""
    if _is_fsdp(model):
        return "FSDP shards the vision tower's weights and gathers them only inside the wrapped model's forward"
    transformers_model = unwrap_model(model)
    vision_model = getattr(transformers_model, "model", None)
    if not hasattr(vision_model, "get_image_features") or not _accepts(vision_model.forward, "mm_encoder_outputs"):
        return f"{type(transformers_model).__name__} does not take precomputed image features (`mm_encoder_outputs`)"
    model = _without_parallel(model)  # parameter names as the family table reads them (no DDP `module.`)
    return _vision_adapter(model, family) or _trained_vision_part(model, family) or _vision_dropout(model, family)


def _trained_vision_part(model: Any, family: ModelFamily) -> str | None:
    trained = [
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and family.part_of(name) in VISION_PARTS
    ]
    if trained:
        return f"{len(trained)} parameters of the vision tower or projector train (e.g. {trained[0]})"
    return None


def _vision_adapter(model: Any, family: ModelFamily) -> str | None:
    """Any adapter module (LoRA layer, modules_to_save copy) under the vision tower or projector, in any adapter:
    a frozen one (TRL's "ref") still makes the reference's features differ from the policy's."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer | AuxiliaryTrainingWrapper) and family.part_of(name) in VISION_PARTS:
            adapters = ", ".join(_adapter_names(module)) or "an adapter"
            return f"the vision tower or projector carries an adapter ({adapters}) at {family.canonical_name(name)}"
    return None


def _adapter_names(module: Any) -> list[str]:
    names = getattr(module, "lora_A", None) or getattr(module, "modules_to_save", None) or {}
    return sorted(names)


def _vision_dropout(model: Any, family: ModelFamily) -> str | None:
    """Dropout in the vision path draws a new mask for each encoding in training: the four encodings differ."""
    for name, module in model.named_modules():
        if family.part_of(name) not in VISION_PARTS:
            continue
        rates = [getattr(module, "p", 0.0)] if isinstance(module, torch.nn.Dropout) else []
        rates += [getattr(module, attribute, 0.0) for attribute in ("dropout", "attention_dropout")]
        if any(isinstance(rate, float) and rate > 0 for rate in rates):
            return f"the vision path applies dropout in training ({family.canonical_name(name)})"
    return None


def _is_fsdp(model: Any) -> bool:
    """FSDP (1: a wrapper module; 2: modules turned into `FSDPModule`s in place)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        FSDPModule = ()  # noqa: N806
    return any(
        type(module).__name__ == "FullyShardedDataParallel" or isinstance(module, FSDPModule)
        for module in model.modules()
    )


def _accepts(function: Any, parameter: str) -> bool:
    return parameter in inspect.signature(function).parameters


# ---------------------------------------------------------------------------------------------------------------------
# Computing the features once


def with_image_features(model: Any, family: ModelFamily, inputs: dict[str, Any]) -> dict[str, Any]:
    """`inputs` (a DPO batch) with `pixel_values` replaced by `mm_encoder_outputs` computed once, without gradient.

    Only valid when `image_feature_reuse_blocker(model, family)` is None. A batch without images (or with videos, or
    with features already) comes back unchanged; `inputs` itself is never modified.
    """
    if inputs.get("pixel_values") is None or "mm_encoder_outputs" in inputs or "pixel_values_videos" in inputs:
        return inputs
    vision_model = unwrap_model(model).model
    half_rows = None
    if family.name in FLAT_PATCH_FAMILIES and inputs.get("image_grid_thw") is not None:
        half_rows = _repeated_half_rows(inputs["pixel_values"], inputs["image_grid_thw"])
    with torch.no_grad():
        if half_rows is None:
            features = _kept_fields(_encode(vision_model, inputs))
        else:  # the first half of the images, encoded once and repeated for the second
            grid = inputs["image_grid_thw"]
            first_half = {"pixel_values": inputs["pixel_values"][:half_rows], "image_grid_thw": grid[: len(grid) // 2]}
            features = _doubled(_kept_fields(_encode(vision_model, first_half)))
    reused = {key: value for key, value in inputs.items() if key != "pixel_values"}
    reused["mm_encoder_outputs"] = {"image": features}
    return reused


def _encode(vision_model: Any, inputs: dict[str, Any]) -> Any:
    """`get_image_features` with the image inputs it names (pixel_values, image_grid_thw, pixel_attention_mask,
    image_sizes, image_position_ids, ...): what the model's forward would pass it."""
    parameters = inspect.signature(vision_model.get_image_features).parameters
    image_inputs = {name: inputs[name] for name in parameters if inputs.get(name) is not None}
    return vision_model.get_image_features(**image_inputs, return_dict=True)


def _repeated_half_rows(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> int | None:
    """The patch rows of the first half of the images when the second half repeats them exactly (TRL's chosen and
    rejected rows share their images), else None."""
    images = len(image_grid_thw)
    first, second = image_grid_thw[: images // 2], image_grid_thw[images // 2 :]
    if not images or images % 2 or not torch.equal(first, second):
        return None
    rows = int(first.prod(dim=-1).sum())
    if 2 * rows != len(pixel_values) or not torch.equal(pixel_values[:rows], pixel_values[rows:]):
        return None
    return rows


def _kept_fields(features: Any) -> Any:
    """A new output of the same class holding only what the forward reads."""
    return type(features)(**{field: features[field] for field in FEATURE_FIELDS if features.get(field) is not None})


def _doubled(features: Any) -> Any:
    """Per-image features of the first half -> of both halves: the per-image tuples repeated (per layer for
    DeepStack's), in the order of the batch's images."""
    doubled = {"pooler_output": tuple(features.pooler_output) * 2}
    if features.get("deepstack_features") is not None:
        doubled["deepstack_features"] = [tuple(layer) * 2 for layer in features.deepstack_features]
    return type(features)(**doubled)


# ---------------------------------------------------------------------------------------------------------------------
# GRPO: each distinct image encoded once per generation batch


class ImageFeatureCache:
    """GRPO's image features, each distinct image encoded once per generation batch.

    TRL's GRPO batch repeats every prompt, images included, once per generation, and encodes all of them in the
    generation's prefill, in the reference pass and in each policy pass (and the old-policy pass where one runs). While
    `serving(model)` is active, the model's `get_image_features` (which its forward and `generate` call) looks each
    image up here by its pixels (exactly: equal patches, checked with `torch.equal`) and encodes only those it has not
    seen, once, without gradient. `clear()` starts a new generation batch. Only valid while
    `image_feature_reuse_blocker` finds nothing (frozen vision tower and projector, no adapter on them, no dropout),
    and for the flat-patch families (`FLAT_PATCH_FAMILIES`), whose images are rows of patches with a grid each.
    """

    def __init__(self) -> None:
        self.entries: dict[tuple, list[tuple[torch.Tensor, dict[str, Any]]]] = {}
        self.encoded = 0  # images encoded, for the benchmark and the tests
        self.served = 0  # images asked for

    def clear(self) -> None:
        self.entries.clear()

    @contextmanager
    def serving(self, model: Any) -> Iterator[None]:
        vision_model = unwrap_model(model).model
        if "get_image_features" in vars(vision_model):  # already serving (nested): keep the outer one
            yield
            return
        original = vision_model.get_image_features
        signature = inspect.signature(original)

        # The original's signature shows through (`generate` reads it to pick the encoder's inputs).
        @functools.wraps(original)
        def cached_image_features(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            pixel_values, grid = bound.arguments.get("pixel_values"), bound.arguments.get("image_grid_thw")
            if pixel_values is None or grid is None:
                return original(*args, **kwargs)
            return self._features(original, pixel_values, grid)

        vision_model.get_image_features = cached_image_features
        try:
            yield
        finally:
            del vision_model.get_image_features

    def _features(self, encode: Any, pixel_values: torch.Tensor, grid: torch.Tensor) -> Any:
        rows = grid.prod(dim=-1).tolist()
        images = list(torch.split(pixel_values, rows))
        found: list[dict[str, Any] | None] = [self._lookup(patches, grid[i]) for i, patches in enumerate(images)]
        # The images not seen yet, each distinct one once (a batch repeats each prompt's images per generation).
        first_of: dict[int, int] = {}
        distinct: list[int] = []
        for i, features in enumerate(found):
            if features is not None:
                continue
            same = next(
                (j for j in distinct if torch.equal(grid[j], grid[i]) and torch.equal(images[j], images[i])), None
            )
            if same is None:
                distinct.append(i)
                same = i
            first_of[i] = same
        if distinct:
            with torch.no_grad():
                output = encode(torch.cat([images[i] for i in distinct]), grid[distinct], return_dict=True)
            self.encoded += len(distinct)
            for position, i in enumerate(distinct):
                features = {"class": type(output), "pooler_output": output.pooler_output[position]}
                if output.get("deepstack_features") is not None:
                    features["deepstack_features"] = [layer[position] for layer in output.deepstack_features]
                self._store(images[i], grid[i], features)
                found[i] = features
            for i, same in first_of.items():
                found[i] = found[same]
        self.served += len(images)
        result = {"pooler_output": tuple(features["pooler_output"] for features in found)}
        if "deepstack_features" in found[0]:
            layers = len(found[0]["deepstack_features"])
            result["deepstack_features"] = [
                tuple(features["deepstack_features"][layer] for features in found) for layer in range(layers)
            ]
        return found[0]["class"](**result)

    @staticmethod
    def _key(patches: torch.Tensor, grid: torch.Tensor) -> tuple:
        # A cheap summary narrows the candidates; `torch.equal` decides.
        return (tuple(grid.tolist()), float(patches.float().sum()), float(patches[::2].float().abs().sum()))

    def _lookup(self, patches: torch.Tensor, grid: torch.Tensor) -> dict[str, Any] | None:
        for stored, features in self.entries.get(self._key(patches, grid), []):
            if torch.equal(stored, patches):
                return features
        return None

    def _store(self, patches: torch.Tensor, grid: torch.Tensor, features: dict[str, Any]) -> None:
        self.entries.setdefault(self._key(patches, grid), []).append((patches, features))


def generation_reuse_blocker(model: Any, family: ModelFamily) -> str | None:
    """GRPO: None when `ImageFeatureCache` serves exactly what the forwards compute; else why not."""
    if family.name not in FLAT_PATCH_FAMILIES:
        return f"reuse across generations is implemented for the Qwen-VL families, not {family.name}"
    return image_feature_reuse_blocker(model, family)
