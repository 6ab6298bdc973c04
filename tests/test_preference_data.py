"""Preference formatters (`rlaif_v`, `preference`), generated preference data, and how both meet TRL's collator."""

import json

import pytest
from PIL import Image

from vlm_recipes.configs import DataArguments
from vlm_recipes.data.formatters import FormatError, find_matching_formatters, get_formatter, preference, rlaif_v
from vlm_recipes.data.loading import load_datasets
from vlm_recipes.data.synthetic import Chart, make_preference_rows, save_generated_dataset, wrong_answer
from vlm_recipes.errors import DataError, RecipeError


IMAGE = Image.new("RGB", (64, 48), "white")


def rlaif_v_row(**changes):
    """A row shaped like openbmb/RLAIF-V-Dataset's (all its columns), with answers in its style."""
    row = {
        "ds_name": "RLAIF-V",
        "image": IMAGE,
        "question": "What is the man on the left holding in his right hand?",
        "chosen": "The man on the left is holding a red umbrella in his right hand, above his head.",
        "rejected": "The man on the left is holding a smartphone and a cup of coffee in his right hand.",
        "origin_dataset": "VQAv2",
        "origin_split": '{"model": "OmniLMM-12B", "feedback_model": "RLAIF-V", "type": "question_answering"}',
        "idx": 17,
        "image_path": "vqav2/train2014/COCO_train2014_000000000017.jpg",
    }
    row.update(changes)
    return row


def user(*blocks):
    return {"role": "user", "content": list(blocks)}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


IMAGE_BLOCK = {"type": "image", "text": None}


def text(value):
    return {"type": "text", "text": value}


# ---------------------------------------------------------------------------------------------------------------------
# rlaif_v


def test_rlaif_v_rows_become_conversational_preference_pairs():
    row = rlaif_v_row()
    out = rlaif_v(row)
    assert out == {
        "images": [IMAGE],
        "prompt": [user(IMAGE_BLOCK, text(row["question"]))],
        "chosen": [assistant(row["chosen"])],
        "rejected": [assistant(row["rejected"])],
    }


def test_rlaif_v_system_prompt_and_an_explicit_placeholder():
    out = rlaif_v(rlaif_v_row(question="Look at <image> and say what the man holds."), system_prompt="Be exact.")
    assert out["prompt"] == [
        {"role": "system", "content": [text("Be exact.")]},
        user(text("Look at"), IMAGE_BLOCK, text("and say what the man holds.")),
    ]


@pytest.mark.parametrize(
    "changes, reason, column",
    [
        ({"rejected": " The man on the left is holding a red umbrella in his right hand, above his head. "},
         "'chosen' and 'rejected' are identical", "rejected"),
        ({"chosen": "   "}, "'chosen' is empty", "chosen"),
        ({"rejected": ""}, "'rejected' is empty", "rejected"),
        ({"chosen": None}, "'chosen' is missing", "chosen"),
        ({"rejected": ["a", "b"]}, "'rejected' is not text", "rejected"),
        ({"image": None}, "'image' is missing", "image"),
        ({"question": "<image> or <image>?"}, "<image> placeholders do not match the images", "question"),
    ],
)  # fmt: skip
def test_rlaif_v_bad_rows_have_a_stable_reason(changes, reason, column):
    with pytest.raises(FormatError) as info:
        rlaif_v(rlaif_v_row(**changes))
    assert info.value.reason == reason and info.value.column == column


def test_preference_formatters_are_registered_for_the_preference_task():
    assert get_formatter("rlaif_v", "preference").name == "rlaif_v"
    assert get_formatter("preference", "preference").name == "preference"
    with pytest.raises(RecipeError, match="Unknown formatter 'chartqa' for preference data.*preference, rlaif_v"):
        get_formatter("chartqa", "preference")
    with pytest.raises(RecipeError, match="for sft data"):
        get_formatter("rlaif_v", "sft")
    assert "rlaif_v" in find_matching_formatters(list(rlaif_v_row()), "preference")
    assert find_matching_formatters(["prompt", "chosen", "rejected", "images"], "preference") == ["preference"]


# ---------------------------------------------------------------------------------------------------------------------
# preference


def test_preference_on_rlaif_v_formatted_rows():
    # HuggingFaceH4/rlaif-v_formatted as its parquet stores it: content blocks are {text, type} structs.
    row = {
        "prompt": [user(IMAGE_BLOCK, text("What is the setting of the picture?"))],
        "chosen": [assistant("A train runs along a track through fields, with trees and power lines behind.")],
        "rejected": [assistant("An open area with train tracks, fields and a river.")],
        "images": [IMAGE],
    }
    assert preference(row) == row


def test_preference_jsonl_style_text_with_placeholders_and_image_paths(tmp_path):
    row = {"prompt": "<image>\nHow many bars are there?", "chosen": "4", "rejected": "It is 6.", "image": "c/1.png"}
    out = preference(row, image_root=tmp_path, system_prompt="One word.")
    assert out == {
        "images": [str(tmp_path / "c/1.png")],
        "prompt": [
            {"role": "system", "content": [text("One word.")]},
            user(IMAGE_BLOCK, text("How many bars are there?")),
        ],
        "chosen": [assistant("4")],
        "rejected": [assistant("It is 6.")],
    }


def test_preference_implicit_prompt_is_the_turns_both_answers_share():
    question = {"role": "user", "content": "<image>Which year peaks?"}
    row = {
        "chosen": [question, {"role": "assistant", "content": "2004"}],
        "rejected": [question, {"role": "assistant", "content": "2001"}],
        "images": ["a.png"],
    }
    out = preference(row)
    assert out["prompt"] == [user(IMAGE_BLOCK, text("Which year peaks?"))]
    assert out["chosen"] == [assistant("2004")] and out["rejected"] == [assistant("2001")]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "<image>Q", "chosen": "A", "rejected": "A", "images": ["a.png"]},
         "'chosen' and 'rejected' are identical"),
        ({"prompt": "<image>Q", "chosen": [assistant("A")], "rejected": [assistant("A")], "images": ["a.png"]},
         "'chosen' and 'rejected' are identical"),
        ({"prompt": "<image>Q", "chosen": [], "rejected": "B", "images": ["a.png"]}, "'chosen' is empty"),
        ({"prompt": "<image>Q", "chosen": [assistant("  ")], "rejected": "B", "images": ["a.png"]},
         "'chosen' is empty"),
        ({"prompt": "<image>Q", "chosen": "A", "images": ["a.png"]}, "'rejected' is missing"),
        ({"prompt": "<image>Q", "chosen": "A", "rejected": "", "images": ["a.png"]}, "'rejected' is empty"),
        ({"prompt": "", "chosen": "A", "rejected": "B", "images": []}, "'prompt' is empty"),
        ({"prompt": "Q", "chosen": "A", "rejected": "B", "images": ["a.png"]},
         "<image> placeholders do not match the images"),
        ({"prompt": "<image>Q", "chosen": "<image>A", "rejected": "B", "images": ["a.png", "b.png"]},
         "image in a completion"),
        ({"prompt": "<image>Q", "chosen": [user(text("Q")), assistant("A")], "rejected": "B", "images": ["a.png"]},
         "non-assistant turn in a completion"),
        ({"chosen": [assistant("A")], "rejected": [assistant("B")], "images": []}, "'prompt' is missing"),
        ({"chosen": [user(text("Q")), assistant("A")], "rejected": [user(text("Q")), assistant("A")]},
         "'chosen' and 'rejected' are identical"),
    ],
)  # fmt: skip
def test_preference_bad_rows_have_a_stable_reason(row, reason):
    with pytest.raises(FormatError) as info:
        preference(row)
    assert info.value.reason == reason


# ---------------------------------------------------------------------------------------------------------------------
# Generated preference data, loading, and TRL's vision preference collator


def test_wrong_answers_are_wrong_and_of_the_same_kind():
    import random

    chart = Chart(image=IMAGE, questions=[], shown=[["Lamb", "Corn", "Rice"], ["12", "40", "7"]])
    rng = random.Random(0)
    for _ in range(20):
        assert wrong_answer("Corn", chart, rng) in {"Lamb", "Rice"}
        assert wrong_answer("40", chart, rng) in {"12", "7"}
        count = wrong_answer("3", chart, rng)  # a count the chart does not show: a nearby number
        assert count != "3" and float(count).is_integer()
    assert wrong_answer("Yes", chart, rng) == "No" and wrong_answer("No", chart, rng) == "Yes"


def test_generated_preference_rows_follow_rlaif_v():
    rows = make_preference_rows(40, seed=1)
    assert len(rows) == 40
    assert set(rows[0]) == set(rlaif_v_row())
    assert all(row["chosen"] != row["rejected"] for row in rows)
    wordy = [row for row in rows if " " in row["rejected"]]
    assert 0.2 < len(wordy) / len(rows) < 0.8  # about half the rejected answers also ignore the one-word instruction
    assert rows == make_preference_rows(40, seed=1)  # reproducible


def test_generated_preferences_load_format_and_collate_with_trl(tmp_path, tiny_qwen):
    from transformers import AutoProcessor
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    folder = save_generated_dataset(tmp_path / "prefs", "rlaif_v", train_rows=6, test_rows=2, seed=3)
    data_args = DataArguments(dataset_name=str(folder), formatter="rlaif_v", system_prompt="One word.")
    train, evaluation, report = load_datasets(data_args, task="preference")
    assert (len(train), len(evaluation), report.rejected) == (6, 2, 0)
    assert isinstance(train[0]["images"][0], Image.Image)
    raw = make_preference_rows(6, seed=3)

    processor = AutoProcessor.from_pretrained(tiny_qwen)
    batch = DataCollatorForVisionPreference(processor=processor)([train[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 6  # chosen rows, then rejected rows
    assert batch["image_grid_thw"].shape[0] == 6  # each image repeated for its chosen and its rejected sequence
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for index in range(6):
        completion = batch["input_ids"][index][batch["completion_mask"][index].bool()]
        expected = raw[index % 3]["chosen" if index < 3 else "rejected"]
        assert processor.decode(completion).strip() == f"{expected}<|im_end|>"
        assert (batch["input_ids"][index] == image_pad).sum() > 0  # the prompt holds the image


def test_bad_pairs_are_counted_by_reason_and_skipped(tmp_path):
    rows = [
        {"prompt": "<image>Q1", "chosen": "4", "rejected": "5", "images": ["a.png"]},
        {"prompt": "<image>Q2", "chosen": "4", "rejected": "4", "images": ["a.png"]},
        {"prompt": "<image>Q3", "chosen": "Yes", "rejected": "", "images": ["a.png"]},
        {"prompt": "<image>Q4", "rejected": "No", "images": ["a.png"]},
        {"prompt": "<image>Q5", "chosen": "Lamb", "rejected": "Corn", "images": ["a.png"]},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    data_args = DataArguments(dataset_name=str(path), formatter="preference", dataset_test_split="none")
    train, _, report = load_datasets(data_args, task="preference")
    assert train["chosen"] == [[assistant("4")], [assistant("Lamb")]]
    reasons = report.to_dict()["train"]["rejected_by_reason"]
    assert {reason: entry["examples"] for reason, entry in reasons.items()} == {
        "'chosen' and 'rejected' are identical": ["line 2"],
        "'rejected' is empty": ["line 3"],
        "'chosen' is missing": ["line 4"],
    }
    assert (
        "pairs.jsonl, line 2, column 'rejected'" in reasons["'chosen' and 'rejected' are identical"]["first_message"]
    )
    report.publish(
        tmp_path / "data_report.json", max_bad_fraction=0.6
    )  # 3 of 5 rejected: allowed here, and written down
    assert json.loads((tmp_path / "data_report.json").read_text())["train"]["rejected"] == 3
    with pytest.raises(DataError, match="3 of 5 rows of the 'train' split were rejected"):
        report.publish(tmp_path / "data_report.json", max_bad_fraction=0.5)
