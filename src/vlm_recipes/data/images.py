"""Images as the model should see them: fully decoded, in RGB, at a size the processor can take.

`decode_image` reads every pixel (not only the header), so a corrupt or truncated file fails here, before training,
instead of at step 9,000. `to_rgb` turns any mode into correct RGB: transparency is composited over white (a plain
`convert("RGB")`, which processors do, turns transparent pixels black), 16-bit and 32-bit grayscale are scaled to 8 bits
(not clipped, which turns most of a 16-bit image white), CMYK and palettes are converted. `plan_size` fixes sizes the
processor cannot take (Qwen-VL: an aspect ratio over 200, a side shorter than its 28-pixel patch-merge factor) by
resizing where that is safe, and rejects the image otherwise.

Nothing here knows about rows: `vlm_recipes.data.checks` applies these to every row. `with_image_decoding` switches a
dataset's image column between PIL images and encoded bytes (header reads need no decode).
"""

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image, UnidentifiedImageError


# Qwen-VL's smart_resize (and GLM-4V, Qwen3-VL, ...) raise for an aspect ratio above this.
SMART_RESIZE_MAX_ASPECT_RATIO = 200
# Squashing an image's long side by more than this to reach the processor's aspect-ratio limit distorts it too much to
# call safe: such rows are rejected instead.
MAX_ASPECT_SQUASH = 2.0
# Modes that carry transparency (or may, for palettes): composited over white.
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
# Integer and float grayscale modes of more than 8 bits, with the value range of their pixels.
WIDE_GRAYSCALE_RANGES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535, "F": None}


class ImageProblem(ValueError):
    """An image that cannot be used. `reason` is a short, stable category under which the data report counts rows."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def _open(value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return Image.open(io.BytesIO(data))
        value = path
    if isinstance(value, str | Path):
        path = Path(value)
        if not path.is_file():
            raise ImageProblem(f"was not found at {path}", reason="image file not found")
        return Image.open(path)
    if value is None:
        raise ImageProblem("is missing (null)", reason="image is missing")
    raise ImageProblem(f"is a {type(value).__name__}, not an image, a path or image bytes", reason="not an image")


def decode_image(value: Any) -> Image.Image:
    """Open and fully decode an image given as a PIL image, a path, or a datasets `{"bytes", "path"}` dict."""
    try:
        image = _open(value)
        image.load()  # every pixel: a truncated or corrupt file fails here, not only one with a bad header
        return image
    except ImageProblem:
        raise
    except Image.DecompressionBombError as error:
        raise ImageProblem(f"is too large to decode safely: {error}", reason="image too large to decode") from None
    except UnidentifiedImageError:
        raise ImageProblem(
            "is not a readable image (unknown format or corrupt bytes)", reason="corrupt or truncated image"
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        # PIL reports truncated and damaged files as OSError ("image file is truncated", "broken data stream").
        raise ImageProblem(f"could not be decoded in full: {error}", reason="corrupt or truncated image") from None


def image_size(value: Any) -> tuple[int, int]:
    """(width, height) from the header only, without decoding the pixels (for length computations)."""
    if isinstance(value, Image.Image):
        return value.size
    try:
        with _open(value) as image:
            return image.size
    except ImageProblem:
        raise
    except Image.DecompressionBombError as error:
        raise ImageProblem(f"is too large to decode safely: {error}", reason="image too large to decode") from None
    except (OSError, SyntaxError, ValueError):
        raise ImageProblem(
            "is not a readable image (unknown format or corrupt bytes)", reason="corrupt or truncated image"
        ) from None


# ---------------------------------------------------------------------------------------------------------------------
# Mode


def _over_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _wide_grayscale_to_rgb(image: Image.Image) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float64)
    top = WIDE_GRAYSCALE_RANGES[image.mode]
    if top is None:  # float images: 0-1 if they look normalised, else 0-255
        top = 1.0 if pixels.size and np.nanmax(pixels) <= 1.0 else 255.0
    scaled = np.clip(np.nan_to_num(pixels) * (255.0 / top), 0, 255).round().astype(np.uint8)
    return Image.fromarray(scaled, mode="L").convert("RGB")


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in ALPHA_MODES or (image.mode != "RGB" and image.has_transparency_data)


def rgb_conversion(image: Image.Image) -> str | None:
    """How `to_rgb` converts this image (a note for the data report), or None when it is RGB already."""
    mode = image.mode
    if mode == "RGB":
        return None
    if _has_transparency(image):
        return f"{mode} with transparency -> RGB over white"
    if mode in WIDE_GRAYSCALE_RANGES:
        return f"{mode} ({'float' if mode == 'F' else 'wide'}) grayscale -> RGB, scaled to 8 bits"
    return f"{mode} -> RGB"


def to_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB: transparency over white, wide grayscale scaled (not clipped), other modes converted."""
    if image.mode == "RGB":
        return image
    if _has_transparency(image):
        return _over_white(image)
    if image.mode in WIDE_GRAYSCALE_RANGES:
        return _wide_grayscale_to_rgb(image)
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------------------------------
# Size


@dataclass(frozen=True)
class SizeRule:
    """The sizes a processor takes.

    `min_image_side`: images with a shorter side are rejected (a 1x1 or 2x2 image is a placeholder, not content).
    `min_side`: shorter sides (down to `min_image_side`) are scaled up to this, keeping the aspect ratio.
    `max_aspect_ratio`: longer-than-this images are squashed to it when that changes the shape by at most
    `MAX_ASPECT_SQUASH`, and rejected otherwise.
    """

    min_image_side: int = 4
    min_side: int = 1
    max_aspect_ratio: float | None = None

    @classmethod
    def for_processor(cls, processor: Any, min_image_side: int = 4) -> "SizeRule":
        image_processor = getattr(processor, "image_processor", processor)
        patch, merge = getattr(image_processor, "patch_size", None), getattr(image_processor, "merge_size", None)
        if isinstance(patch, int) and isinstance(merge, int):  # Qwen-VL style smart_resize
            return cls(min_image_side, min_side=patch * merge, max_aspect_ratio=SMART_RESIZE_MAX_ASPECT_RATIO)
        return cls(min_image_side)


@dataclass(frozen=True)
class SizePlan:
    """The size an image goes to the processor at, and why it changed."""

    size: tuple[int, int]  # (width, height) as stored
    target: tuple[int, int]  # (width, height) to resize to before the processor
    notes: tuple[str, ...] = ()

    @property
    def resized(self) -> bool:
        return self.target != self.size


def plan_size(width: int, height: int, rule: SizeRule) -> SizePlan:
    """Where the image's size must change for the processor to take it; `ImageProblem` where no safe change exists."""
    if min(width, height) < rule.min_image_side:
        raise ImageProblem(
            f"is {width}x{height} pixels: a side shorter than min_image_side ({rule.min_image_side}) holds no content "
            "to learn from",
            reason="image too small",
        )
    new_width, new_height, notes = float(width), float(height), []
    ratio = max(width, height) / min(width, height)
    if rule.max_aspect_ratio and ratio > rule.max_aspect_ratio:
        squash = ratio / rule.max_aspect_ratio
        if squash > MAX_ASPECT_SQUASH:
            raise ImageProblem(
                f"is {width}x{height} pixels: its aspect ratio {ratio:.0f}:1 is over the processor's limit of "
                f"{rule.max_aspect_ratio:g}:1, and squashing it {squash:.1f}x to fit would distort it too much",
                reason="image aspect ratio too extreme",
            )
        short = min(width, height)
        long_side = math.floor(short * rule.max_aspect_ratio)
        new_width, new_height = (long_side, height) if width > height else (width, long_side)
        notes.append(f"aspect ratio over {rule.max_aspect_ratio:g}:1 -> squashed to {rule.max_aspect_ratio:g}:1")
    short = min(new_width, new_height)
    if short < rule.min_side:
        scale = rule.min_side / short
        new_width, new_height = new_width * scale, new_height * scale
        notes.append(f"side under {rule.min_side} px -> scaled up")
    target = (max(rule.min_side, round(new_width)), max(rule.min_side, round(new_height)))
    return SizePlan(size=(width, height), target=target, notes=tuple(notes))


def scaled_plan(plan: SizePlan, scale: float, rule: SizeRule) -> SizePlan:
    """`plan` downscaled by `scale` (to fit a token budget), keeping to the rule's smallest side."""
    width, height = plan.target
    short = min(width, height)
    scale = max(scale, min(1.0, rule.min_side / short))  # never below the side the processor needs
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    return SizePlan(size=plan.size, target=target, notes=(*plan.notes, "downscaled to fit max_length"))


# ---------------------------------------------------------------------------------------------------------------------
# Preparing and storing


def prepare_image(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """The decoded image in RGB at `target` (width, height): what the processor should see."""
    rgb = to_rgb(image)
    if rgb.size != tuple(target):
        rgb = rgb.resize(tuple(target), Image.Resampling.BICUBIC if _upscaling(rgb.size, target) else Image.LANCZOS)
    return rgb


def _upscaling(size: tuple[int, int], target: tuple[int, int]) -> bool:
    return target[0] * target[1] > size[0] * size[1]


def encode_image(image: Image.Image, source_format: str | None) -> dict[str, Any]:
    """A datasets image value (`{"bytes", "path"}`): JPEG sources stay JPEG (quality 95), everything else PNG."""
    buffer = io.BytesIO()
    if (source_format or "").upper() in {"JPEG", "JPG", "MPO"}:
        image.save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def fixed_image_value(value: Any, target: tuple[int, int]) -> dict[str, Any]:
    """Decode `value`, convert and resize it, and encode the result: a value that needs no more fixing."""
    image = decode_image(value)
    source_format = image.format
    return encode_image(prepare_image(image, target), source_format)


# ---------------------------------------------------------------------------------------------------------------------
# A dataset's image column


def image_column(dataset: datasets.Dataset) -> str | None:
    return next((name for name in ("images", "image") if name in dataset.column_names), None)


def with_image_decoding(dataset: datasets.Dataset, column: str | None, decode: bool) -> datasets.Dataset:
    """Cast the image column's Image feature to decode (PIL images) or not (`{"bytes", "path"}` dicts)."""
    if column is None:
        return dataset
    feature = dataset.features[column]
    many = isinstance(feature, datasets.List | datasets.Sequence)
    inner = feature.feature if many else feature
    if not isinstance(inner, datasets.Image) or inner.decode == decode:
        return dataset
    return dataset.cast_column(
        column, type(feature)(datasets.Image(decode=decode)) if many else datasets.Image(decode=decode)
    )
