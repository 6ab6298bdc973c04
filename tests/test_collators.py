"""Our vision collators give exactly TRL's output (every key, every element), faster: the SFT assistant mask without a
per-token loop, and each DPO prompt with its images processed once."""

import logging
import random

import pytest
import torch
from PIL import Image, ImageDraw
from transformers.processing_utils import ProcessorMixin
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from vlm_recipes.compat import ASSISTANT_MASK_METHOD as MASK_METHOD
from vlm_recipes.modeling.chat_templates import read_template
from vlm_recipes.modeling.families import FAMILIES
from vlm_recipes.training import collators
from vlm_recipes.training.collators import (
    VisionPreferenceCollator,
    VisionSFTCollator,
    adjust_assistant_masks_indices,
)


# Qwen2.5-VL (pixel patches of every image in one tensor), SmolVLM (tiles, padded per row), Gemma 3 (fixed size,
# token_type_ids), Qwen3-VL (the newer Qwen processor).
FAMILIES_UNDER_TEST = ["qwen2_5_vl", "smolvlm", "gemma3", "qwen3_vl"]


@pytest.fixture(scope="module", params=FAMILIES_UNDER_TEST)
def family_processor(request, tiny_models):
    from transformers import AutoProcessor

    return request.param, AutoProcessor.from_pretrained(tiny_models(request.param))


def training_template(family: str) -> str:
    return read_template(FAMILIES[family].training_template)


def chart(size, seed):
    """An image with content (bars), so that pixel values differ across the image and between images."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    width, height = size
    for index in range(4):
        top = rng.randint(0, height - 2)
        draw.rectangle(
            [index * width // 4, top, (index + 1) * width // 4 - 1, height - 1], fill=(rng.randint(0, 255), 90, 40)
        )
    return image


IMAGE = {"type": "image"}


def user(*blocks):
    return {
        "role": "user",
        "content": [block if isinstance(block, dict) else {"type": "text", "text": block} for block in blocks],
    }


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def sft_examples():
    """Three rows, built fresh for each collator (TRL's collators rewrite the rows they are given): three assistant
    turns with an image in the first and the last question; one image; two images of other sizes in one turn."""
    return [
        {
            "images": [chart((96, 64), 0), chart((40, 120), 1)],
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
                user(IMAGE, "What is the tallest bar?"),
                assistant("The third one."),
                user("And its colour?"),
                assistant("Dark red."),
                user(IMAGE, "Is this the same chart?"),
                assistant("No, it is narrower."),
            ],
        },
        {"images": [chart((150, 100), 2)], "messages": [user(IMAGE, "How many bars?"), assistant("Four.")]},
        {
            "images": [chart((64, 64), 3), chart((120, 56), 4)],
            "messages": [user(IMAGE, IMAGE, "Which one is wider?"), assistant("The second image is wider.")],
        },
    ]


def preference_examples():
    return [
        {
            "images": [chart((96, 64), 0)],
            "prompt": [user(IMAGE, "What is the tallest bar?")],
            "chosen": [assistant("The third one.")],
            "rejected": [assistant("The first one, I think.")],
        },
        {
            "images": [chart((40, 120), 1), chart((150, 100), 2)],
            "prompt": [user(IMAGE, IMAGE, "Which one is wider?")],
            "chosen": [assistant("The second.")],
            "rejected": [assistant("Neither.")],
        },
        {
            "images": [chart((64, 64), 3)],
            "prompt": [user(IMAGE, "How many bars?")],
            "chosen": [assistant("Four.")],
            "rejected": [assistant("Seven bars in all.")],
        },
    ]


def assert_identical(ours, theirs):
    assert list(ours.keys()) == list(theirs.keys())
    for key, value in theirs.items():
        assert type(ours[key]) is type(value), key
        if isinstance(value, torch.Tensor):
            assert ours[key].dtype == value.dtype, key
            assert torch.equal(ours[key], value), key
        else:
            assert ours[key] == value, key


def labelled_spans(labels):
    """How many runs of labelled (not -100) positions a row has."""
    labelled = (labels != -100).int()
    return int((labelled[1:] > labelled[:-1]).sum() + labelled[0])


# ---------------------------------------------------------------------------------------------------------------------
# SFT


@pytest.mark.parametrize("settings", [{}, {"pad_to_multiple_of": 16}], ids=["padded", "multiple_of_16"])
def test_sft_batch_equals_trls_on_every_key(family_processor, settings):
    family, processor = family_processor
    arguments = dict(
        processor=processor, assistant_only_loss=True, chat_template=training_template(family), **settings
    )
    theirs = DataCollatorForVisionLanguageModeling(**arguments)(sft_examples())
    ours = VisionSFTCollator(**arguments)(sft_examples())
    assert_identical(ours, theirs)
    labels = ours["labels"]
    assert (labels == -100).any() and (labels != -100).any()
    assert [labelled_spans(row) for row in labels] == [3, 1, 1]  # every assistant turn, also after expanded images
    assert MASK_METHOD not in vars(processor)  # nothing left on the processor, which is saved with the model


def test_sft_truncated_batch_equals_trls(tiny_qwen):
    """A `max_length` that cuts the last answer of the long row in the middle: its span matches the tokens kept."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_qwen)
    arguments = dict(processor=processor, assistant_only_loss=True, chat_template=training_template("qwen2_5_vl"))
    full = VisionSFTCollator(**arguments)(sft_examples())
    last_answer = full["labels"][0].ne(-100).nonzero().max().item()
    arguments["max_length"] = last_answer - 2
    theirs = DataCollatorForVisionLanguageModeling(**arguments)(sft_examples())
    ours = VisionSFTCollator(**arguments)(sft_examples())
    assert_identical(ours, theirs)
    assert ours["labels"].shape[1] == last_answer - 2 and labelled_spans(ours["labels"][0]) == 3


def test_sft_uses_the_vectorised_mask_and_leaves_nothing_on_the_processor(tiny_qwen, monkeypatch):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_qwen)
    arguments = dict(processor=processor, assistant_only_loss=True, chat_template=training_template("qwen2_5_vl"))
    expected = DataCollatorForVisionLanguageModeling(**arguments)(sft_examples())

    def per_token_loop(self, processed_dict, generation_indices):
        raise AssertionError("transformers' per-token loop ran")

    monkeypatch.setattr(type(processor), MASK_METHOD, per_token_loop)
    assert_identical(VisionSFTCollator(**arguments)(sft_examples()), expected)
    assert MASK_METHOD not in vars(processor)

    # Also when the processor fails mid-call: the attribute is gone.
    broken = sft_examples()
    broken[1]["images"] = []  # an image placeholder without its image
    with pytest.raises(ValueError, match="does not match"):
        VisionSFTCollator(**arguments)(broken)
    assert MASK_METHOD not in vars(processor)


def test_sft_without_the_known_method_runs_trls_collator_and_warns_once(tiny_qwen, monkeypatch, caplog):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_qwen)
    arguments = dict(processor=processor, assistant_only_loss=True, chat_template=training_template("qwen2_5_vl"))
    expected = DataCollatorForVisionLanguageModeling(**arguments)(sft_examples())
    original = ProcessorMixin._adjust_assistant_masks_indices

    def other_version(self, processed_dict, generation_indices, *, strict=True):  # a different signature
        return original(self, processed_dict, generation_indices)

    monkeypatch.setattr(type(processor), MASK_METHOD, other_version)
    collators._warn_no_mask_method.cache_clear()
    collator = VisionSFTCollator(**arguments)
    with caplog.at_level(logging.WARNING, logger=collators.__name__):
        batches = [collator(sft_examples()) for _ in range(2)]
    for batch in batches:
        assert_identical(batch, expected)
    assert [record.levelname for record in caplog.records] == ["WARNING"]
    assert MASK_METHOD not in vars(processor)


def test_sft_without_assistant_only_loss_is_trls(tiny_qwen):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_qwen)
    theirs = DataCollatorForVisionLanguageModeling(processor=processor)(sft_examples())
    assert_identical(VisionSFTCollator(processor=processor)(sft_examples()), theirs)


def random_mask_case(rng: random.Random, rows: int = 3, length: int = 40):
    """Offsets, spans and placeholder expansions like a processor's, with the corner cases: padding and special tokens
    of zero width, spans starting or ending exactly at a placeholder's end, spans past the truncated text."""
    offset_mapping, generation_indices, replacement_offsets = [], [], []
    for _ in range(rows):
        tokens, position = [], 0
        for _ in range(rng.randint(length // 2, length)):
            width = rng.choice([0, 1, 1, 2, 3, 5])
            tokens.append((position, position + width))
            position += width + rng.choice([0, 0, 1])
        tokens += [(0, 0)] * (length - len(tokens))  # padding
        offset_mapping.append(tokens)
        replacements, gained, original_position = [], 0, 0
        for _ in range(rng.randint(0, 3)):
            start = original_position + rng.randint(0, 6)
            end = start + rng.randint(1, 3)
            growth = rng.randint(0, 12)
            replacements.append({"span": (start, end), "new_span": (start + gained, end + gained + growth)})
            gained += growth
            original_position = end
        replacement_offsets.append(replacements)
        ends = [r["span"][1] for r in replacements]
        spans = []
        for _ in range(rng.randint(0, 3)):
            start = rng.choice([rng.randint(0, position + 10), *ends])
            spans.append((start, start + rng.choice([0, 1, rng.randint(1, 30)])))
        generation_indices.append(spans)
    return offset_mapping, generation_indices, replacement_offsets


def processed(offsets, replacements):
    """What the processor hands `_adjust_assistant_masks_indices` (`return_tensors="pt"`)."""
    return {
        "input_ids": torch.zeros(len(offsets), len(offsets[0]), dtype=torch.long),
        "offset_mapping": torch.tensor(offsets),
        "text_replacement_offsets": replacements,
    }


@pytest.mark.parametrize("with_replacements", [True, False])
def test_vectorised_mask_equals_transformers_loop_on_random_cases(with_replacements):
    rng = random.Random(0)
    for _ in range(300):
        offsets, spans, replacements = random_mask_case(rng)
        if not with_replacements:
            replacements = None

        expected = ProcessorMixin._adjust_assistant_masks_indices(None, processed(offsets, replacements), spans)
        ours = adjust_assistant_masks_indices(None, processed(offsets, replacements), spans)
        assert set(ours) == set(expected) == {"input_ids", "assistant_masks"}
        assert torch.equal(ours["assistant_masks"], torch.tensor(expected["assistant_masks"]))
        assert ours["assistant_masks"].dtype == torch.tensor(expected["assistant_masks"]).dtype


# ---------------------------------------------------------------------------------------------------------------------
# DPO


def test_processing_a_doubled_prompt_list_is_the_once_processed_output_twice(family_processor):
    """The claim `VisionPreferenceCollator` rests on, key by key: rows, images and image patches along dim 0."""
    _, processor = family_processor
    examples = preference_examples()
    prompts = [
        processor.apply_chat_template(e["prompt"], tokenize=False, add_generation_prompt=True) for e in examples
    ]
    images = [e["images"] for e in examples]
    settings = dict(padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
    once = processor(images=images, text=prompts, **settings)
    doubled = processor(images=images * 2, text=prompts * 2, **settings)
    assert list(once.keys()) == list(doubled.keys())
    for key, value in doubled.items():
        assert torch.equal(value, torch.cat((once[key], once[key]))), key


def test_preference_batch_equals_trls_and_processes_each_image_once(family_processor, monkeypatch):
    family, processor = family_processor
    image_processor_class = type(processor.image_processor)
    seen = []
    process_images = image_processor_class.__call__

    def counting(self, images, *args, **kwargs):
        seen.append(sum(len(row) if isinstance(row, list) else 1 for row in images))
        return process_images(self, images, *args, **kwargs)

    monkeypatch.setattr(image_processor_class, "__call__", counting)
    theirs = DataCollatorForVisionPreference(processor=processor)(preference_examples())
    trl_images, seen[:] = sum(seen), []
    collator = VisionPreferenceCollator(processor=processor)
    ours = collator(preference_examples())
    assert_identical(ours, theirs)
    assert sum(seen) * 2 == trl_images == 8  # 4 images, TRL processes each twice
    assert collator.processor is processor  # the proxy was the call's alone
    completion = ours["completion_mask"]
    assert completion.shape[0] == 6 and (completion.sum(dim=1) > 0).all() and (completion == 0).any()


def test_preference_batch_with_truncation_equals_trls(tiny_qwen):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_qwen)
    theirs = DataCollatorForVisionPreference(processor=processor, max_length=40)(preference_examples())
    ours = VisionPreferenceCollator(processor=processor, max_length=40)(preference_examples())
    assert_identical(ours, theirs)
