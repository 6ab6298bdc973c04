"""`image_min_pixels`/`image_max_pixels` in each family's own image-size rule (the rule is a column of the family table).

The recipe fields say one thing for every family: the largest (smallest) image area, in pixels, the processor keeps,
which bounds the image tokens per image. Each rule translates that to its processor's setting, or says clearly why it
does not apply.
"""

import logging
import math
from typing import Any

from vlm_recipes.errors import RecipeError
from vlm_recipes.modeling.families import (
    FIXED,
    GRID_PINPOINTS,
    LONGEST_EDGE,
    PIXEL_AREA,
    SOFT_TOKENS,
    ModelFamily,
)


logger = logging.getLogger(__name__)

GEMMA4_SOFT_TOKENS = (70, 140, 280, 560, 1120)  # the values Gemma4ImageProcessor accepts


def bound_image_size(processor: Any, family: ModelFamily, min_pixels: int | None, max_pixels: int | None) -> None:
    if min_pixels is None and max_pixels is None:
        return
    image_processor = processor.image_processor
    rule = family.image_size
    if rule == PIXEL_AREA:
        _pixel_area(image_processor, min_pixels, max_pixels)
        return
    if min_pixels is not None:
        raise RecipeError(f"`image_min_pixels` does not apply to {family.name}: {_RULE_TEXT[rule]}.")
    if rule == LONGEST_EDGE:
        _longest_edge(image_processor, family, max_pixels)
    elif rule == SOFT_TOKENS:
        _soft_tokens(image_processor, family, max_pixels)
    else:
        raise RecipeError(
            f"`image_max_pixels` does not apply to {family.name}: {_RULE_TEXT[rule]}. Drop it from the recipe."
        )


_RULE_TEXT = {
    LONGEST_EDGE: "every image is resized so that its longest edge is the processor's `size.longest_edge`, then "
    "tiled (`image_max_pixels` lowers that edge)",
    SOFT_TOKENS: "each image keeps at most `max_soft_tokens` tokens (`image_max_pixels` picks that budget)",
    GRID_PINPOINTS: "each image is fitted to one of the processor's `image_grid_pinpoints` resolutions, which the "
    "model's config shares (at most 672x672 or 1008x336 for the llava-v1.6 checkpoints: 5 tiles of 576 tokens)",
    FIXED: "every image is resized to one fixed square size, so the image-token count is fixed",
}


def _pixel_area(image_processor: Any, min_pixels: int | None, max_pixels: int | None) -> None:
    """Qwen-VL: `size` holds `shortest_edge`/`longest_edge` as pixel areas."""
    size = dict(image_processor.size or {})
    if "longest_edge" not in size and "max_pixels" not in size:
        raise RecipeError(
            f"`image_min_pixels`/`image_max_pixels` apply to processors that bound the image area (Qwen-VL); "
            f"{type(image_processor).__name__} sizes images by {sorted(size)}."
        )
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    image_processor.size = size


def _longest_edge(image_processor: Any, family: ModelFamily, max_pixels: int) -> None:
    """Idefics3/SmolVLM: the longest edge, a whole number of vision tiles, whose square fits in `max_pixels`."""
    tile = image_processor.max_image_size["longest_edge"]
    tiles = math.isqrt(max_pixels) // tile
    if tiles < 1:
        raise RecipeError(
            f"image_max_pixels {max_pixels:,} is below one {tile}x{tile} tile ({tile * tile:,} pixels), the smallest "
            f"image {family.name} sees."
        )
    image_processor.size = {"longest_edge": tiles * tile}
    logger.info(
        "image_max_pixels %s: images resized to a longest edge of %d px (at most %dx%d tiles of %d px + a global view).",
        f"{max_pixels:,}",
        tiles * tile,
        tiles,
        tiles,
        tile,
    )


def _soft_tokens(image_processor: Any, family: ModelFamily, max_pixels: int) -> None:
    """Gemma 4: the largest `max_soft_tokens` whose pixels (one token per (patch x pooling)^2 pixels) fit."""
    pixels_per_token = (image_processor.patch_size * image_processor.pooling_kernel_size) ** 2
    fitting = [tokens for tokens in GEMMA4_SOFT_TOKENS if tokens * pixels_per_token <= max_pixels]
    if not fitting:
        smallest = GEMMA4_SOFT_TOKENS[0]
        raise RecipeError(
            f"image_max_pixels {max_pixels:,} is below {family.name}'s smallest image budget: {smallest} tokens of "
            f"{pixels_per_token:,} pixels = {smallest * pixels_per_token:,} pixels."
        )
    image_processor.max_soft_tokens = fitting[-1]
    logger.info("image_max_pixels %s: at most %d image tokens per image.", f"{max_pixels:,}", fitting[-1])
