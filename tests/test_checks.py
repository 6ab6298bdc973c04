"""Data checks before training: every row of every split, rejected by reason or fixed, and the fixes reach the data."""

import json

import numpy as np
import pytest
from bad_inputs import FIXED, MAX_LENGTH, OUTSIDE_LINES, REJECTED, VALID_LINES, write_bad_input_dataset
from datasets import Dataset
from PIL import Image

from vlm_recipes.configs import DataArguments, ReliabilityArguments
from vlm_recipes.data.checks import CheckPolicy, check_datasets, check_training_data
from vlm_recipes.data.images import SizeRule
from vlm_recipes.data.lengths import TokenCounter
from vlm_recipes.data.loading import load_datasets
from vlm_recipes.data.report import DataReport
from vlm_recipes.errors import DataError


@pytest.fixture(scope="module")
def processor(tiny_qwen):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_qwen)


def load_and_check(path, processor, max_length=None, formatter="conversations", **reliability):
    train, evaluation, report = load_datasets(DataArguments(dataset_name=str(path), formatter=formatter))
    train, evaluation = check_training_data(
        train,
        evaluation,
        report,
        processor,
        ReliabilityArguments(**reliability),
        max_length,
    )
    return train, report


def test_bad_inputs_are_rejected_by_reason_or_fixed_and_valid_rows_kept(tmp_path, processor):
    path = write_bad_input_dataset(tmp_path / "data")
    train, report = load_and_check(path, processor, max_length=MAX_LENGTH)
    split = report.to_dict()["train"]
    by_line = {}
    for reason, details in split["rejected_by_reason"].items():
        for example in details["examples"]:
            by_line[int(example.removeprefix("line "))] = reason
    assert by_line == REJECTED
    fixed = {int(e.removeprefix("line ")): kind for kind, d in split["fixed_by_kind"].items() for e in d["examples"]}
    assert fixed == FIXED
    kept = sorted(int(label.removeprefix("line ")) for label in train["source_row"])
    assert kept == [*VALID_LINES, *FIXED, *OUTSIDE_LINES]
    assert split["rows_with_images_outside_the_data_folder"] == {"count": 1, "examples": ["line 26"]}

    # Every message names the file, the line and the column; paths relative to the data folder (the report is pushed).
    messages = {reason: details["first_message"] for reason, details in split["rejected_by_reason"].items()}
    assert messages["image file not found"].startswith(f"{path.name}, line 9, column 'images': image 0 was not found")
    assert (
        f"{path.name}, line 16, column 'messages': turn 1 should hold text, got int 42" in messages["turn is not text"]
    )
    assert report.splits["train"].rejections["image file not found"].message.startswith(str(path))  # on screen
    assert "line 20, column 'messages': is " in messages["longer than max_length"]
    assert f"longer than max_length {MAX_LENGTH}" in messages["longer than max_length"]
    assert "1x1 pixels" in messages["image too small"]
    assert "line 18, column 'messages': the row has neither 'messages' nor 'conversations'" in str(messages)


def test_fixes_reach_the_training_data(tmp_path, processor):
    path = write_bad_input_dataset(tmp_path / "data")
    train, _ = load_and_check(path, processor, max_length=MAX_LENGTH)
    images = {label: row[0] for label, row in zip(train["source_row"], train["images"])}
    assert all(image.mode == "RGB" for image in images.values())
    red, green, blue = images["line 10"].getpixel((10, 10))  # CMYK (0, 255, 255, 0) is red
    assert red > 240 and green < 15 and blue < 15
    assert images["line 11"].getpixel((5, 5)) == (255, 255, 255)  # transparent palette pixels: white, not black
    assert images["line 11"].getpixel((0, 0)) == (255, 0, 0)
    assert images["line 12"].getpixel((5, 5)) == (156, 156, 156)  # 16-bit 257*156 scaled, not clipped to 255
    assert images["line 14"].size == (8000, 40)  # 10000x40 squashed to Qwen's 200:1
    assert images["line 1"].size == (64, 48)  # valid images untouched


def test_too_long_rows_are_dropped_or_their_images_downscaled_to_fit(tmp_path, processor):
    chart = tmp_path / "big.png"
    Image.new("RGB", (1400, 1000), "white").save(chart)
    rows = [
        {
            "messages": [{"role": "user", "content": "<image>Value?"}, {"role": "assistant", "content": "7"}],
            "images": ["big.png"],
        }
    ]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    counter = TokenCounter(processor)
    full = counter.count(
        load_datasets(DataArguments(dataset_name=str(path), formatter="conversations"))[0][0]["messages"],
        [(1400, 1000)],
    )
    assert full.total > 600

    dropped, report = load_and_check(path, processor, max_length=600)
    assert len(dropped) == 0 and "longer than max_length" in report.to_dict()["train"]["rejected_by_reason"]

    kept, report = load_and_check(path, processor, max_length=600, too_long="downscale")
    image = kept[0]["images"][0]
    count = counter.count(kept[0]["messages"], [image.size])
    assert image.size[0] < 1400 and abs(image.size[0] / image.size[1] - 1.4) < 0.02  # shape kept
    assert 500 < count.total <= 600  # fits, and not shrunk more than needed
    assert "images downscaled to fit max_length" in report.to_dict()["train"]["fixed_by_kind"]

    text_only = tmp_path / "t.jsonl"
    text_only.write_text(
        json.dumps({"messages": [{"role": "user", "content": "word " * 900}, {"role": "assistant", "content": "x"}]})
        + "\n"
    )
    kept, report = load_and_check(text_only, processor, max_length=600, too_long="downscale")
    assert len(kept) == 0  # nothing to downscale: the text alone is too long


def test_eval_split_and_dataset_folders_are_checked_with_row_numbers(tmp_path, processor):
    from vlm_recipes.data.synthetic import chartqa_features, make_chartqa_rows, save_splits

    train_rows, test_rows = make_chartqa_rows(6, seed=1), make_chartqa_rows(4, seed=2)
    test_rows[2]["image"] = Image.new("RGBA", (60, 40), (0, 0, 0, 0))
    train_rows[4]["image"] = Image.new("RGB", (2, 2))
    folder = save_splits(tmp_path / "ds", {"train": train_rows, "test": test_rows}, chartqa_features())
    train, evaluation, report = load_datasets(DataArguments(dataset_name=str(folder)), need_eval=True)
    train, evaluation = check_training_data(train, evaluation, report, processor, ReliabilityArguments(), None)
    details = report.to_dict()
    assert details["train"]["rejected_by_reason"]["image too small"]["examples"] == ["row 4"]
    assert details["train"]["source"] == "ds"  # the dataset folder's name: data_report.json holds no local path
    assert details["train"]["rejected_by_reason"]["image too small"]["first_message"].startswith(
        "ds, row 4, column 'images'"
    )
    assert details["eval"]["fixed_by_kind"]["RGBA with transparency -> RGB over white"]["examples"] == ["row 2"]
    assert (len(train), len(evaluation)) == (5, 4)
    assert evaluation[2]["images"][0].getpixel((0, 0)) == (255, 255, 255)


def test_too_many_rejections_stop_the_run_naming_reason_and_rows(tmp_path, processor):
    path = write_bad_input_dataset(tmp_path / "data")
    _, report = load_and_check(path, processor, max_length=MAX_LENGTH)
    with pytest.raises(
        DataError,
        match=r"rows of the 'train' split were rejected.*Most common: image is not a path or an image \(3 rows",
    ):
        report.stop_if_too_many_rejected(0.05)


def test_chartqa_rows_with_a_missing_or_numeric_question_are_named(tmp_path, processor):
    Image.new("RGB", (50, 40)).save(tmp_path / "c.png")
    rows = [
        {"image": "c.png", "query": "What is shown?", "label": [42]},  # a numeric answer is a ChartQA answer: kept
        {"image": "c.png", "label": ["7"]},
        {"image": "c.png", "query": 123, "label": ["7"]},
    ]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    train, report = load_and_check(path, processor, formatter="chartqa")
    reasons = report.to_dict()["train"]["rejected_by_reason"]
    assert reasons["'query' is missing"]["examples"] == ["line 2"]
    assert "line 3, column 'query': should be text, got int" in reasons["'query' is not text"]["first_message"]
    assert train[0]["messages"][-1]["content"][0]["text"] == "42"


def test_preference_rows_are_checked_the_same_way(tmp_path, processor):
    good = Image.new("RGB", (80, 60), "red")
    prompt = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Describe."}]}]

    def answer(text):
        return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]

    dataset = Dataset.from_list(
        [
            {"images": [good], "prompt": prompt, "chosen": answer("A red square."), "rejected": answer("A cat.")},
            {"images": [good], "prompt": prompt, "chosen": answer(""), "rejected": answer("A cat.")},
            {
                "images": [Image.new("LA", (80, 60))],
                "prompt": prompt,
                "chosen": answer("Gray."),
                "rejected": answer("No."),
            },
        ]
    )
    report = DataReport()
    report.split("train", "prefs", len(dataset))
    counter = TokenCounter(processor)
    policy = CheckPolicy(size_rule=SizeRule.for_processor(processor))
    checked = check_datasets({"train": dataset}, report, counter, policy)["train"]
    details = report.to_dict()["train"]
    assert details["rejected_by_reason"]["empty answer"]["examples"] == ["row 1"]
    assert "column 'chosen'" in details["rejected_by_reason"]["empty answer"]["first_message"]
    assert details["fixed_by_kind"]["LA with transparency -> RGB over white"]["examples"] == ["row 2"]
    assert len(checked.dataset) == 2 and checked.dataset[1]["images"][0].mode == "RGB"
    first = dataset[0]
    assert checked.tokens[0] == counter.count(first["prompt"] + first["chosen"], [(80, 60)]).total  # the longer pair


def test_checks_in_several_processes_match_one(tmp_path, processor):
    rows = [
        {"images": [Image.new("RGB", (40 + i, 30), "red")], "messages": [
            {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": f"Q{i}"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "" if i % 7 == 3 else "A"}]}]}
        for i in range(24)
    ]  # fmt: skip
    dataset = Dataset.from_list(rows)
    results = []
    for num_proc in (1, 2):
        report = DataReport()
        report.split("train", "rows", len(dataset))
        checked = check_datasets({"train": dataset}, report, TokenCounter(processor), CheckPolicy(), num_proc)
        results.append((checked["train"].tokens, report.to_dict()))
    assert results[0] == results[1]
    assert results[0][1]["train"]["rejected_by_reason"]["empty answer"]["examples"] == ["row 3", "row 10", "row 17"]


def test_checks_can_be_turned_off(tmp_path, processor):
    path = write_bad_input_dataset(tmp_path / "data")
    train, report = load_and_check(path, processor, max_length=MAX_LENGTH, check_data=False)
    assert report.to_dict()["train"]["fixed_by_kind"] == {} and len(train) == 18  # only the formatter ran (8 rejected)


def test_wide_grayscale_survives_the_dataset_round_trip(tmp_path, processor):
    pixels = np.full((30, 40), 257 * 90, dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "g.png")
    path = tmp_path / "g.jsonl"
    path.write_text(
        json.dumps(
            {
                "messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "gray"}],
                "image": "g.png",
            }
        )
        + "\n"
    )
    train, _ = load_and_check(path, processor)
    assert train[0]["images"][0].getpixel((0, 0)) == (90, 90, 90)
