"""Formatters on real ChartQA strings and on conversation rows in both styles."""

import pytest
from PIL import Image

from vlm_recipes.data.formatters import FormatError, chartqa, conversations, find_matching_formatters, get_formatter
from vlm_recipes.errors import RecipeError


def texts(message):
    return [block["text"] for block in message["content"] if block["type"] == "text"]


def kinds(message):
    return [block["type"] for block in message["content"]]


def test_chartqa_on_real_rows(chartqa_human_rows):
    image = Image.new("RGB", (64, 48), "white")
    for raw in chartqa_human_rows:
        # The Hub dataset stores `label` as a list of strings; the sample file stores one string.
        row = {"image": image, "query": raw["query"], "label": [raw["label"]], "human_or_machine": 0}
        out = chartqa(row, system_prompt="Answer briefly.")
        system, user, assistant = out["messages"]
        assert system == {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]}
        assert kinds(user) == ["image", "text"] and texts(user) == [raw["query"].strip()]
        assert assistant["role"] == "assistant" and texts(assistant) == [raw["label"].strip()]
        assert out["images"] == [image]
        assert out["answers"] == [raw["label"].strip()]


def test_chartqa_keeps_every_label_and_trains_on_the_first():
    out = chartqa({"image": "x.png", "query": "How many bars?", "label": ["3", "three"]})
    assert texts(out["messages"][-1]) == ["3"]
    assert out["answers"] == ["3", "three"]
    assert [m["role"] for m in out["messages"]] == ["user", "assistant"]  # no system prompt unless asked


@pytest.mark.parametrize(
    "row, column",
    [
        ({"image": "x.png", "query": "Q?", "label": []}, "label"),
        ({"image": "x.png", "query": "Q?", "label": ["  "]}, "label"),
        ({"image": "x.png", "query": "", "label": ["1"]}, "query"),
        ({"image": "x.png", "query": None, "label": ["1"]}, "query"),
        ({"image": "x.png", "query": 12, "label": ["1"]}, "query"),
        ({"image": None, "query": "Q?", "label": ["1"]}, "image"),
    ],
)
def test_chartqa_bad_rows_name_the_column(row, column):
    with pytest.raises(FormatError) as info:
        chartqa(row)
    assert info.value.column == column


def test_conversations_messages_style_multi_turn_multi_image(tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": "<image>\nWhat is in the first picture?"},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "Compare it with <image> please."},
            {"role": "assistant", "content": "The second shows a dog."},
        ],
        "images": ["a.png", "/abs/b.png"],
    }
    out = conversations(row, image_root=tmp_path)
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user", "assistant"]
    assert kinds(out["messages"][0]) == ["image", "text"]
    assert kinds(out["messages"][2]) == ["text", "image", "text"]
    assert texts(out["messages"][2]) == ["Compare it with", "please."]
    assert out["images"] == [str(tmp_path / "a.png"), "/abs/b.png"]


def test_conversations_llava_sharegpt_style(tmp_path):
    row = {
        "image": "img/1.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe the chart."},
            {"from": "gpt", "value": "Sales rise each year."},
            {"from": "human", "value": "Peak year?"},
            {"from": "gpt", "value": "2014"},
        ],
    }
    out = conversations(row, image_root=tmp_path, system_prompt="Be brief.")
    assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert texts(out["messages"][-1]) == ["2014"]
    assert out["images"] == [str(tmp_path / "img/1.jpg")]


def test_conversations_structured_content_is_accepted():
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A chart."}]},
        ],
        "images": ["a.png"],
    }
    out = conversations(row, image_root="/data")
    assert kinds(out["messages"][0]) == ["image", "text"] and out["images"] == ["/data/a.png"]


@pytest.mark.parametrize(
    "row, fragment",
    [
        (
            {
                "messages": [{"role": "user", "content": "<image><image> Q"}, {"role": "assistant", "content": "A"}],
                "images": ["a.png"],
            },
            "2 <image> placeholder(s)",
        ),
        (
            {
                "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                "images": ["a.png"],
            },
            "0 <image> placeholder(s)",
        ),
        ({"messages": [{"role": "user", "content": "<image> Q"}], "images": ["a.png"]}, "no assistant turn"),
        (
            {
                "conversations": [{"from": "robot", "value": "<image> Q"}, {"from": "gpt", "value": "A"}],
                "image": "a.png",
            },
            "role 'robot'",
        ),
        (
            {
                "messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "  "}],
                "images": ["a.png"],
            },
            "turn 1 (assistant) is empty",
        ),
        ({"messages": [], "images": []}, "non-empty list of turns"),
    ],
)
def test_conversations_bad_rows_are_explained(row, fragment):
    with pytest.raises(FormatError) as info:
        conversations(row)
    assert fragment in str(info.value)
    assert info.value.column in ("messages", "conversations")


def test_registry_lookup_and_matching():
    assert get_formatter("chartqa").task == "sft"
    with pytest.raises(RecipeError, match="Unknown formatter 'chartqaa'.*chartqa"):
        get_formatter("chartqaa")
    assert "chartqa" in find_matching_formatters(["image", "query", "label", "human_or_machine"])
    assert "conversations" in find_matching_formatters(["conversations", "image"])
