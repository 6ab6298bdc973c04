"""Image augmentation of training rows (`data.augmentation`): safe for charts (no flips or rotations), seeded, never
larger than the checked size, applied by the training collator only (a DPO pair's images once)."""

import pytest
from PIL import Image

from vlm_recipes.data.augmentation import (
    AugmentationPolicy,
    Augmenter,
    AugmentingCollator,
    augmentation_grid,
    parse_augmentation,
)
from vlm_recipes.data.images import SizeRule
from vlm_recipes.errors import RecipeError
from vlm_recipes.training.trainers import _train_dataloader


FULL = {
    "brightness": 0.3,
    "contrast": 0.3,
    "saturation": 0.3,
    "crop": 0.1,
    "jpeg_quality": [60, 90],
    "resolution": 0.4,
}


def chart(width=300, height=200) -> Image.Image:
    from vlm_recipes.data.synthetic import make_chartqa_rows

    return make_chartqa_rows(1, seed=5)[0]["image"].convert("RGB").resize((width, height))


@pytest.mark.parametrize("name", ["flip", "horizontal_flip", "rotation"])
def test_flips_and_rotations_are_refused_by_name_with_the_reason(name):
    with pytest.raises(RecipeError, match=f"'{name}' is not offered: .*(mirrored|rotated)"):
        parse_augmentation({name: True})


def test_off_by_default_and_wrong_strengths_refused():
    assert parse_augmentation(None) is None
    assert parse_augmentation('{"brightness": 0.2}') == AugmentationPolicy(brightness=0.2)
    with pytest.raises(RecipeError, match="crop 0.5 should be a number from 0 to 0.15"):
        parse_augmentation({"crop": 0.5})
    with pytest.raises(RecipeError, match="unknown augmentation 'blur'"):
        parse_augmentation({"blur": 1})


def test_augmentation_is_seeded_changes_pixels_and_never_adds_image_tokens(tiny_qwen):
    from transformers import AutoProcessor

    from vlm_recipes.data.lengths import TokenCounter

    processor = AutoProcessor.from_pretrained(tiny_qwen)
    counter, rule = TokenCounter(processor), SizeRule.for_processor(processor)
    policy = parse_augmentation(FULL)
    image = chart()
    first = Augmenter(policy, seed=1, size_rule=rule).image(image)
    again = Augmenter(policy, seed=1, size_rule=rule).image(image)
    assert first.tobytes() == again.tobytes()  # same seed, same augmentation
    assert first.tobytes() != Augmenter(policy, seed=2, size_rule=rule).image(image).tobytes()
    augmenter = Augmenter(policy, seed=0, size_rule=rule)
    for width, height in [(300, 200), (60, 900), (56, 56), (1000, 700)]:
        original = chart(width, height)
        for _ in range(5):
            augmented = augmenter.image(original)
            assert augmented.width <= width and augmented.height <= height
            assert min(augmented.size) >= min(rule.min_side, min(width, height))
            assert counter.image_tokens(*augmented.size) <= counter.image_tokens(width, height)


def test_only_training_batches_are_augmented_and_a_pair_once():
    seen = []
    plain = seen.append  # a collator that records what it is given
    trainer = type("T", (), {})()
    trainer.augmenter, trainer.data_collator = Augmenter(parse_augmentation({"brightness": 0.5}), seed=0), plain
    train_collator = _train_dataloader(trainer, lambda: trainer.data_collator)  # what the train loader is built with
    assert (
        isinstance(train_collator, AugmentingCollator) and trainer.data_collator is plain
    )  # eval keeps the plain one
    image = chart()
    pair = {"images": [image], "prompt": [{"role": "user", "content": "q"}], "chosen": ["a"], "rejected": ["b"]}
    train_collator([pair])
    (given,) = seen[0]
    assert len(given["images"]) == 1 and given["images"][0].tobytes() != image.tobytes()
    assert given["chosen"] == ["a"] and given["rejected"] == ["b"]  # one image set for both answers

    grid = augmentation_grid([image, chart(120, 300)], trainer.augmenter, variants=3, cell=128)
    assert grid.size == (4 * 128, 2 * (128 + 18))
