"""Image augmentation of training rows, safe for charts and documents (`augmentation:` in a recipe; off by default).

    augmentation:
      brightness: 0.2        # each image's brightness times a factor in [0.8, 1.2]
      contrast: 0.2
      saturation: 0.2
      crop: 0.05             # crop up to 5% off each side (what remains is resized back to the image's size)
      jpeg_quality: [70, 95] # re-encode as JPEG at a quality in this range
      resolution: 0.25       # downscale by a factor in [0.75, 1] (never up: the row keeps its checked token count)
      probability: 0.8       # share of training rows augmented (the others stay as they are)
      seed: 0                # default: the recipe's seed

What is left out, on purpose: flips and rotations (a mirrored chart reverses the order of its bars and the reading
direction of its labels; a rotated document or axis reads differently), so they are refused by name. The crop keeps
most of the image so titles, axes and legends stay in view. No augmentation makes an image larger than the size the
data checks counted its tokens at: the crop is resized back to that size, and the resolution jitter only shrinks it,
never below the processor's smallest side, so a row never grows past `max_length`.

Only training rows are augmented: the trainers use `Augmenter` on their training batches (`AugmentingCollator`, built
in `training.trainers`), never on evaluation batches. A DPO pair's chosen and rejected share the prompt's images: they
are augmented once per pair. The random draws are seeded: the same recipe gives the same augmentations in the same
order (a resumed run draws anew from its restart).
"""

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from vlm_recipes.data.images import SizeRule
from vlm_recipes.errors import RecipeError


# Asked for by these names, refused with the reason: they change what a chart or a document says.
REFUSED = {
    "flip": "a mirrored chart reverses the order of its bars and its text",
    "horizontal_flip": "a mirrored chart reverses the order of its bars and its text",
    "hflip": "a mirrored chart reverses the order of its bars and its text",
    "vertical_flip": "an upside-down chart inverts its axes",
    "vflip": "an upside-down chart inverts its axes",
    "rotation": "a rotated chart or document reads differently (axes, lines of text)",
    "rotate": "a rotated chart or document reads differently (axes, lines of text)",
}
LIMITS = {"brightness": 0.5, "contrast": 0.5, "saturation": 0.5, "crop": 0.15, "resolution": 0.5}


@dataclass(frozen=True)
class AugmentationPolicy:
    """What `augmentation:` asks for: each a fraction (0 = off) except `jpeg_quality`, a (low, high) range."""

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    crop: float = 0.0
    jpeg_quality: tuple[int, int] | None = None
    resolution: float = 0.0
    probability: float = 1.0
    seed: int | None = None


def parse_augmentation(value: Any) -> AugmentationPolicy | None:
    """The recipe's `augmentation` (a mapping, or its JSON text on the command line) checked; None when off."""
    if value is None or value == {} or value is False:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise RecipeError(f"augmentation: not a mapping or JSON object ({error.msg}): {value!r:.80}") from None
    if not isinstance(value, Mapping):
        raise RecipeError(f"augmentation: should be a mapping of augmentation: strength, got {value!r:.80}.")
    known = [name for name in AugmentationPolicy.__dataclass_fields__]
    settings: dict[str, Any] = {}
    for name, setting in value.items():
        if name in REFUSED:
            raise RecipeError(f"augmentation: '{name}' is not offered: {REFUSED[name]}. Use {', '.join(LIMITS)}.")
        if name not in known:
            raise RecipeError(f"augmentation: unknown augmentation '{name}'. Known: {', '.join(known)}.")
        if name in LIMITS:
            if isinstance(setting, bool) or not isinstance(setting, int | float) or not 0 <= setting <= LIMITS[name]:
                raise RecipeError(
                    f"augmentation: {name} {setting!r} should be a number from 0 to {LIMITS[name]} (a fraction)."
                )
            setting = float(setting)
        elif name == "jpeg_quality":
            if not (
                isinstance(setting, list | tuple)
                and len(setting) == 2
                and all(isinstance(q, int) and 10 <= q <= 100 for q in setting)
                and setting[0] <= setting[1]
            ):
                raise RecipeError(
                    f"augmentation: jpeg_quality {setting!r} should be [low, high], 10 <= low <= high <= 100."
                )
            setting = (int(setting[0]), int(setting[1]))
        elif name == "probability":
            if isinstance(setting, bool) or not isinstance(setting, int | float) or not 0 < setting <= 1:
                raise RecipeError(f"augmentation: probability {setting!r} should be a number in (0, 1].")
            setting = float(setting)
        elif name == "seed" and (isinstance(setting, bool) or not isinstance(setting, int)):
            raise RecipeError(f"augmentation: seed {setting!r} should be a whole number.")
        settings[name] = setting
    return AugmentationPolicy(**settings)


class Augmenter:
    """Draws and applies augmentations to PIL images, seeded; `size_rule` bounds the resolution jitter from below."""

    def __init__(self, policy: AugmentationPolicy, seed: int, size_rule: SizeRule | None = None):
        self.policy = policy
        self.size_rule = size_rule or SizeRule()
        self.rng = np.random.default_rng([policy.seed if policy.seed is not None else seed, 3])

    def images(self, images: list[Any]) -> list[Any]:
        """One row's images augmented (or all unchanged, with probability 1 - `probability`)."""
        if not images or self.rng.random() >= self.policy.probability:
            return images
        return [self.image(image) if isinstance(image, Image.Image) else image for image in images]

    def image(self, image: Image.Image) -> Image.Image:
        policy, rng = self.policy, self.rng
        result = image.convert("RGB")
        size = result.size
        for strength, enhancer in (
            (policy.brightness, ImageEnhance.Brightness),
            (policy.contrast, ImageEnhance.Contrast),
            (policy.saturation, ImageEnhance.Color),
        ):
            if strength:
                result = enhancer(result).enhance(float(rng.uniform(1 - strength, 1 + strength)))
        if policy.crop:
            width, height = size
            left, right, top, bottom = (rng.uniform(0, policy.crop, size=4) * [width, width, height, height]).astype(
                int
            )
            box = (left, top, max(left + 1, width - right), max(top + 1, height - bottom))
            result = result.crop(box).resize(size, Image.Resampling.BICUBIC)
        if policy.jpeg_quality:
            buffer = io.BytesIO()
            result.save(
                buffer, format="JPEG", quality=int(rng.integers(policy.jpeg_quality[0], policy.jpeg_quality[1] + 1))
            )
            result = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        if policy.resolution:
            scale = float(rng.uniform(1 - policy.resolution, 1.0))
            # never below the processor's smallest side (nor the original, when that is already smaller)
            floor = min(1.0, max(self.size_rule.min_side, self.size_rule.min_image_side) / min(size))
            scale = max(scale, floor)
            target = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
            if target != size:
                result = result.resize(target, Image.Resampling.LANCZOS)
        return result


def build_augmenter(value: Any, seed: int, processor: Any, min_image_side: int = 4) -> Augmenter | None:
    """The run's augmenter from the recipe's `augmentation` (None when off), bounded by the processor's size rule."""
    policy = parse_augmentation(value)
    return None if policy is None else Augmenter(policy, seed, SizeRule.for_processor(processor, min_image_side))


class AugmentingCollator:
    """A collator that augments each example's images (`images`) before the wrapped collator builds the batch; used
    for training batches only. A preference example's prompt images are shared by chosen and rejected: augmented once."""

    def __init__(self, collator: Any, augmenter: Augmenter):
        self.collator, self.augmenter = collator, augmenter

    def __getattr__(self, name: str) -> Any:  # the wrapped collator's settings (TRL reads some)
        return getattr(self.__dict__["collator"], name)

    def __call__(self, examples: list[dict[str, Any]]) -> Any:
        augmented = []
        for example in examples:
            images = example.get("images")
            augmented.append({**example, "images": self.augmenter.images(list(images))} if images else example)
        return self.collator(augmented)


def augmentation_grid(images: list[Image.Image], augmenter: Augmenter, variants: int, cell: int = 256) -> Image.Image:
    """A grid to look at: one row per image, its original first, then `variants` augmentations, each scaled to fit a
    `cell` x `cell` square and labelled with its true size (PIL only)."""
    from PIL import ImageDraw

    label = 18
    grid = Image.new("RGB", ((variants + 1) * cell, len(images) * (cell + label)), "white")
    draw = ImageDraw.Draw(grid)
    for row, image in enumerate(images):
        versions = [image.convert("RGB")] + [augmenter.image(image) for _ in range(variants)]
        for column, version in enumerate(versions):
            scale = min((cell - 8) / version.width, (cell - 8) / version.height)  # small images shown larger
            thumb = version.resize((max(1, round(version.width * scale)), max(1, round(version.height * scale))))
            x, y = column * cell, row * (cell + label)
            grid.paste(thumb, (x + (cell - thumb.width) // 2, y + label + (cell - thumb.height) // 2))
            name = "original" if column == 0 else f"augmented {column}"
            draw.text((x + 4, y + 3), f"{name} {version.width}x{version.height}", fill="black")
    return grid
