"""Loading and formatting whole datasets: Hub-style folders, JSONL with image files, splits, and clear errors."""

import json

import pytest
from PIL import Image

from vlm_recipes.configs import DataArguments
from vlm_recipes.data.loading import load_datasets
from vlm_recipes.errors import DataError, RecipeError


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def conversation_dir(tmp_path):
    (tmp_path / "images").mkdir()
    for name, color in [("a.png", "red"), ("b.png", "blue")]:
        Image.new("RGB", (40, 30), color).save(tmp_path / "images" / name)
    rows = [
        {
            "messages": [{"role": "user", "content": "<image>Color?"}, {"role": "assistant", "content": "red"}],
            "images": ["images/a.png"],
        },
        {
            "conversations": [
                {"from": "human", "value": "<image> and <image>: which is blue?"},
                {"from": "gpt", "value": "The second."},
                {"from": "human", "value": "And the first?"},
                {"from": "gpt", "value": "Red."},
            ],
            "images": ["images/a.png", "images/b.png"],
        },
    ]
    return write_jsonl(tmp_path / "train.jsonl", rows)


def test_chartqa_folder_loads_with_both_splits(chartqa_dir):
    train, evaluation, _ = load_datasets(
        DataArguments(dataset_name=str(chartqa_dir), formatter="chartqa"), need_eval=True
    )
    assert len(train) == 48 and len(evaluation) == 16
    row = train[0]
    assert isinstance(row["images"][0], Image.Image)  # decoded lazily, on access
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    assert row["answers"]


def test_limits_and_held_out_split(chartqa_dir):
    args = DataArguments(dataset_name=str(chartqa_dir), max_train_samples=10, max_eval_samples=3)
    train, evaluation, _ = load_datasets(args)
    assert (len(train), len(evaluation)) == (10, 3)
    args = DataArguments(dataset_name=str(chartqa_dir), eval_split_size=0.25)
    train, evaluation, _ = load_datasets(args)
    assert (len(train), len(evaluation)) == (36, 12)


def test_jsonl_conversations_resolve_images_next_to_the_file(conversation_dir):
    train, evaluation, _ = load_datasets(DataArguments(dataset_name=str(conversation_dir), formatter="conversations"))
    assert evaluation is None  # no test split and evaluation not asked for
    assert len(train) == 2
    assert [image.size for image in train[1]["images"]] == [(40, 30), (40, 30)]
    assert train[1]["images"][1].getpixel((0, 0)) == (0, 0, 255)
    assert len([m for m in train[1]["messages"] if m["role"] == "assistant"]) == 2


def test_jsonl_with_image_dir(tmp_path, conversation_dir):
    rows = [
        {
            "messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "x"}],
            "image": "a.png",
        }
    ]
    path = write_jsonl(tmp_path / "elsewhere.jsonl", rows)
    args = DataArguments(
        dataset_name=str(path), formatter="conversations", image_dir=str(conversation_dir.parent / "images")
    )
    train, _, _ = load_datasets(args)
    assert train[0]["images"][0].size == (40, 30)


def test_missing_eval_split_is_explained_when_evaluation_is_on(conversation_dir):
    with pytest.raises(RecipeError, match="no split 'test'.*eval_split_size"):
        load_datasets(DataArguments(dataset_name=str(conversation_dir), formatter="conversations"), need_eval=True)


def test_missing_train_split_lists_the_splits(chartqa_dir):
    with pytest.raises(RecipeError, match="no split 'validation'. Its splits: test, train"):
        load_datasets(DataArguments(dataset_name=str(chartqa_dir), dataset_train_split="validation"))


def test_missing_columns_name_the_column_and_a_fitting_formatter(conversation_dir):
    with pytest.raises(DataError) as info:
        load_datasets(DataArguments(dataset_name=str(conversation_dir), formatter="chartqa"))
    message = str(info.value)
    assert "column 'image'" in message and "'chartqa' formatter needs" in message and "conversations" in message


def test_bad_rows_are_skipped_counted_and_named(tmp_path):
    good = {
        "messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "x"}],
        "images": ["a.png"],
    }
    bad = {"messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "x"}], "images": []}
    path = write_jsonl(tmp_path / "d.jsonl", [good, bad, good, bad])
    train, _, report = load_datasets(DataArguments(dataset_name=str(path), formatter="conversations"))
    assert len(train) == 2
    split = report.to_dict()["train"]
    assert (split["rows"], split["kept"], split["rejected"]) == (4, 2, 2)
    ((reason, details),) = split["rejected_by_reason"].items()
    assert reason == "<image> placeholders do not match the images"
    assert details["examples"] == ["line 2", "line 4"]
    # data_report.json holds the path relative to the data folder (it is pushed with the run), never this machine's
    assert details["first_message"].startswith("d.jsonl, line 2, column 'messages'")
    assert str(tmp_path) not in json.dumps(report.to_dict())
    assert "1 <image> placeholder(s)" in details["first_message"] and "0 image(s)" in details["first_message"]
    with pytest.raises(
        DataError, match=r"2 of 4 rows of the 'train' split were rejected \(50% > max_bad_fraction 5%\)"
    ):
        report.stop_if_too_many_rejected(0.05)
    report.stop_if_too_many_rejected(0.5)  # at the limit: the run goes on


def test_bad_row_in_a_dataset_folder_is_named_by_row(tmp_path):
    from vlm_recipes.data.synthetic import chartqa_features, make_chartqa_rows, save_splits

    rows = make_chartqa_rows(4, seed=1)
    rows[2]["query"] = ""
    folder = save_splits(tmp_path / "ds", {"train": rows}, chartqa_features())
    train, _, report = load_datasets(DataArguments(dataset_name=str(folder)))
    assert len(train) == 3 and train[2]["messages"][0]["content"][1]["text"] == rows[3]["query"]
    details = report.to_dict()["train"]["rejected_by_reason"]["'query' is empty"]
    assert details["examples"] == ["row 2"] and "row 2, column 'query': is empty" in details["first_message"]


def test_invalid_json_line_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"messages": []}\n{not json}\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2: is not valid JSON"):
        load_datasets(DataArguments(dataset_name=str(path), formatter="conversations"))


def test_unknown_formatter_fails_before_loading(tmp_path):
    with pytest.raises(RecipeError, match="Unknown formatter 'nope'"):
        load_datasets(DataArguments(dataset_name=str(tmp_path / "does-not-matter"), formatter="nope"))
