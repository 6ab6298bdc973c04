"""Images as the model should see them: decoded in full, correct RGB from any mode, sizes the processor can take."""

import io

import numpy as np
import pytest
from PIL import Image

from vlm_recipes.data.images import (
    ImageProblem,
    SizeRule,
    decode_image,
    fixed_image_value,
    image_size,
    plan_size,
    rgb_conversion,
    to_rgb,
)


QWEN_RULE = SizeRule(min_image_side=4, min_side=28, max_aspect_ratio=200)


def encoded(image, format="PNG", **options):
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return {"bytes": buffer.getvalue(), "path": None}


def noise(width, height):
    return Image.fromarray(np.random.RandomState(0).randint(0, 255, (height, width, 3), dtype=np.uint8))


def test_decoding_reads_every_pixel_not_only_the_header():
    whole = encoded(noise(120, 90))["bytes"]
    truncated = {"bytes": whole[: len(whole) // 2], "path": None}
    assert image_size(truncated) == (120, 90)  # the header alone looks fine
    with pytest.raises(ImageProblem, match="could not be decoded in full") as info:
        decode_image(truncated)
    assert info.value.reason == "corrupt or truncated image"
    assert decode_image({"bytes": whole, "path": None}).size == (120, 90)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ({"bytes": b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, "path": None}, "corrupt or truncated image"),
        ({"bytes": b"not an image at all", "path": None}, "corrupt or truncated image"),
        ({"bytes": None, "path": "/nonexistent/chart.png"}, "image file not found"),
        (None, "image is missing"),
        (42, "not an image"),
    ],
)
def test_unusable_images_have_a_reason(value, reason):
    with pytest.raises(ImageProblem) as info:
        decode_image(value)
    assert info.value.reason == reason


def test_transparency_goes_over_white_not_black():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black, as many PNG exports store it
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    assert rgba.convert("RGB").getpixel((1, 1)) == (0, 0, 0)  # what a plain convert (and the processor) gives
    rgb = to_rgb(rgba)
    assert rgb.mode == "RGB" and rgb.getpixel((1, 1)) == (255, 255, 255) and rgb.getpixel((0, 0)) == (255, 0, 0)

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.putpixel((0, 0), 1)
    reloaded = decode_image(encoded(palette, transparency=0))
    assert reloaded.mode == "P" and "transparency" in rgb_conversion(reloaded)
    assert to_rgb(reloaded).getpixel((1, 1)) == (255, 255, 255) and to_rgb(reloaded).getpixel((0, 0)) == (255, 0, 0)

    gray_alpha = Image.new("LA", (2, 2), (0, 0))
    assert to_rgb(gray_alpha).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    pixels = np.array([[0, 257 * 100], [257 * 200, 65535]], dtype=np.uint16)
    reloaded = decode_image(encoded(Image.fromarray(pixels)))
    assert reloaded.mode.startswith("I")
    assert reloaded.convert("RGB").getpixel((1, 0)) == (255, 255, 255)  # clipping: mid-gray becomes white
    rgb = to_rgb(reloaded)
    assert [rgb.getpixel(xy)[0] for xy in [(0, 0), (1, 0), (0, 1), (1, 1)]] == [0, 100, 200, 255]


def test_cmyk_and_grayscale_become_rgb():
    cmyk = decode_image(encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), format="JPEG"))
    assert rgb_conversion(cmyk) == "CMYK -> RGB"
    red, green, blue = to_rgb(cmyk).getpixel((4, 4))
    assert red > 240 and green < 15 and blue < 15
    assert to_rgb(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)
    rgb = Image.new("RGB", (2, 2))
    assert to_rgb(rgb) is rgb and rgb_conversion(rgb) is None


def test_sizes_the_processor_cannot_take_are_fixed_where_safe():
    assert not plan_size(640, 480, QWEN_RULE).resized
    wide = plan_size(10000, 40, QWEN_RULE)  # aspect 250:1, over Qwen's 200:1: squashed by 1.25
    assert wide.target == (8000, 40) and "squashed" in wide.notes[0]
    thin = plan_size(10, 500, QWEN_RULE)  # a side under the 28 px patch-merge factor: scaled up, shape kept
    assert thin.target == (28, 1400) and "scaled up" in thin.notes[0]
    both = plan_size(5, 1200, QWEN_RULE)  # squashed to 200:1 first, then scaled up to the minimum side
    assert both.target[0] == 28 and both.target[1] / both.target[0] <= 200


@pytest.mark.parametrize(("size", "reason"), [((1, 1), "image too small"), ((20000, 40), "aspect ratio")])
def test_sizes_with_no_safe_fix_are_rejected(size, reason):
    with pytest.raises(ImageProblem) as info:
        plan_size(*size, QWEN_RULE)
    assert reason in info.value.reason


def test_size_rule_comes_from_the_processor(tiny_qwen):
    from transformers import AutoProcessor

    rule = SizeRule.for_processor(AutoProcessor.from_pretrained(tiny_qwen), min_image_side=3)
    assert rule == SizeRule(min_image_side=3, min_side=28, max_aspect_ratio=200)
    assert SizeRule.for_processor(object()) == SizeRule()  # a processor without a smart-resize rule: no limits


def test_fixed_image_is_rgb_at_its_target_size_and_keeps_jpeg():
    value = encoded(Image.new("CMYK", (100, 50), (0, 0, 0, 0)), format="JPEG")
    fixed = fixed_image_value(value, (60, 30))
    image = decode_image(fixed)
    assert (image.mode, image.size, image.format) == ("RGB", (60, 30), "JPEG")
    png = decode_image(fixed_image_value(encoded(Image.new("RGBA", (10, 10))), (10, 10)))
    assert (png.mode, png.format) == ("RGB", "PNG")
