"""Tasks as units: registry, formatter defaults, prompt presets (their exact texts and where they come from), the
formatters of the new tasks on their Hub schemas, and the generated datasets in those schemas."""

import pytest

from vlm_recipes.data.formatters import FORMATTERS, FormatError, multiple_choice, vqa
from vlm_recipes.errors import RecipeError
from vlm_recipes.tasks import RECIPE_PRESET, TASKS, get_task, task_for_formatter
from vlm_recipes.tasks.base import prompt_messages


def user_text(messages):
    return [block["text"] for block in messages[-1]["content"] if block["type"] == "text"][-1]


def image_blocks(messages):
    return sum(block["type"] == "image" for message in messages for block in message["content"])


def test_every_task_is_complete():
    assert set(TASKS) == {"chartqa", "docvqa", "infovqa", "textvqa", "vqav2", "multiple_choice", "conversation"}
    for task in TASKS.values():
        assert task.formatter in FORMATTERS and FORMATTERS[task.formatter].task == "sft"
        assert task.metrics and task.max_new_tokens > 0 and task.card_text and task.hub_task_type
        assert task.presets[0].name == RECIPE_PRESET and task.presets[0].text is None
        assert len({preset.name for preset in task.presets}) == len(task.presets)
        assert all(preset.source for preset in task.presets)
        assert all(metric.description and metric.compare_with for metric in task.metrics)


def test_task_lookup_and_formatter_defaults():
    assert get_task("docvqa").formatter == "vqa" and get_task("multiple_choice").formatter == "multiple_choice"
    assert task_for_formatter("chartqa").name == "chartqa"
    assert task_for_formatter("conversations").name == "conversation"
    assert task_for_formatter("vqa").name == "docvqa"  # the first task of that formatter
    assert task_for_formatter("rlaif_v") is None
    with pytest.raises(RecipeError, match="Unknown task 'chartq'.*chartqa, docvqa"):
        get_task("chartq")
    with pytest.raises(RecipeError, match="no prompt preset 'lmms_eval'.*recipe"):
        get_task("conversation").preset("lmms_eval")


CHART_ROW = {
    "question": "How many bars are shown in the chart?",
    "messages": [
        {"role": "system", "content": [{"type": "text", "text": "Answer with a single word or number."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many bars are shown in the chart?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "3"}]},
    ],
}  # fmt: skip


def test_chartqa_presets_build_the_harnesses_prompts():
    task = get_task("chartqa")
    assert task.preset("recipe").messages(CHART_ROW) == prompt_messages(CHART_ROW["messages"])  # what trained
    expected = "How many bars are shown in the chart?\nAnswer the question using a single word or phrase."
    for name in ("lmms_eval", "vlmevalkit"):
        messages = task.preset(name).messages(CHART_ROW)
        assert [m["role"] for m in messages] == ["user"]  # no system prompt, as the harnesses send none
        assert user_text(messages) == expected and image_blocks(messages) == 1
    assert "chartqa.yaml" in task.preset("lmms_eval").source and "image_vqa.py" in task.preset("vlmevalkit").source


def test_textvqa_lmms_eval_capitalizes_the_question():
    row = {"question": "what does the SIGN say?", "messages": CHART_ROW["messages"][1:]}
    assert user_text(get_task("textvqa").preset("lmms_eval").messages(row)) == (
        "What does the sign say?\nAnswer the question using a single word or phrase."
    )
    assert user_text(get_task("textvqa").preset("vlmevalkit").messages(row)).startswith("what does the SIGN say?\n")


def test_multiple_choice_presets():
    row = multiple_choice(
        {"question": "Which is a mammal?", "choices": ["shark", "whale"], "answer": 1, "image": "x.png", "hint": "Hm."}
    )
    task = get_task("multiple_choice")
    assert user_text(task.preset("recipe").messages(row)) == "Context: Hm.\nWhich is a mammal?\nA. shark\nB. whale"
    assert user_text(task.preset("lmms_eval").messages(row)) == (
        "Context: Hm.\nWhich is a mammal?\nA. shark\nB. whale\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert user_text(task.preset("lmms_eval_mmmu").messages(row)) == (
        "Which is a mammal?\nA. shark\nB. whale\n\nAnswer with the option's letter from the given choices directly."
    )
    assert user_text(task.preset("vlmevalkit").messages(row)) == (
        "Hint: Hm.\nQuestion: Which is a mammal?\nOptions:\nA. shark\nB. whale\n"
        "Please select the correct answer from the options above. \n"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Formatters of the new tasks


def test_vqa_formatter_on_docvqa_textvqa_and_vqav2_rows():
    doc = vqa({"image": "p.png", "question": " What is the total? ", "answers": ["$1,284.50", "1,284.50"]})
    assert doc["answers"] == ["$1,284.50", "1,284.50"] and doc["question"] == "What is the total?"
    assert user_text(doc["messages"][:-1]) == "What is the total?" and user_text(doc["messages"]) == "$1,284.50"
    text = vqa({"image": "s.png", "question": "what?", "answers": ["stop sign"] * 3 + ["stop"] * 7})
    assert user_text(text["messages"]) == "stop" and len(text["answers"]) == 10  # trains on the most given answer
    vqav2 = vqa({"image": "i.png", "question": "Color?", "answers": [{"answer": "red", "answer_id": 1}] * 10})
    assert vqav2["answers"] == ["red"] * 10


@pytest.mark.parametrize(
    "row, column, fragment",
    [
        ({"image": "p.png", "question": "Q?", "answers": []}, "answers", "non-empty list"),
        ({"image": "p.png", "question": "Q?", "answers": [" ", None]}, "answers", "no non-empty answer"),
        ({"image": None, "question": "Q?", "answers": ["a"]}, "image", "missing"),
        ({"image": "p.png", "question": "", "answers": ["a"]}, "question", "empty"),
    ],
)
def test_vqa_formatter_bad_rows_name_the_column(row, column, fragment):
    with pytest.raises(FormatError, match=fragment) as info:
        vqa(row)
    assert info.value.column == column


def test_multiple_choice_formatter_reads_scienceqa_ai2d_and_mmmu():
    scienceqa = multiple_choice({"image": "a.png", "question": "Q?", "choices": ["x", "y", "z"], "answer": 2})
    assert scienceqa["answers"] == ["C"] and scienceqa["options"] == ["x", "y", "z"] and scienceqa["hint"] == ""
    ai2d = multiple_choice({"image": "a.png", "question": "Q?", "options": ["x", "y"], "answer": "1"})
    assert ai2d["answers"] == ["B"]
    mmmu = multiple_choice(
        {"question": "<image 1> vs <image 2>?", "options": "['x', 'y', 'z', 'w']", "answer": "D", "image_1": "1.png",
         "image_2": "2.png", "image_3": None}
    )  # fmt: skip
    assert mmmu["answers"] == ["D"] and mmmu["images"] == ["1.png", "2.png"] and image_blocks(mmmu["messages"]) == 2
    text_only = multiple_choice({"question": "Q?", "choices": ["x", "y"], "answer": 0, "image": None})
    assert text_only["images"] == [] and image_blocks(text_only["messages"]) == 0


@pytest.mark.parametrize(
    "row, column, fragment",
    [
        ({"question": "Q?", "choices": ["x"], "answer": 0}, "choices", "at least two options"),
        ({"question": "Q?", "options": "not a list", "answer": 0}, "options", "should be a list"),
        ({"question": "Q?", "choices": ["x", " "], "answer": 0}, "choices", "empty option"),
        ({"question": "Q?", "choices": ["x", "y"], "answer": 2}, "answer", "index (0-1) or letter (A-B)"),
        ({"question": "Q?", "choices": ["x", "y"], "answer": "C"}, "answer", "index (0-1) or letter (A-B)"),
        ({"question": "Q?", "choices": ["x", "y"], "answer": None}, "answer", "got None"),
    ],
)
def test_multiple_choice_formatter_bad_rows_name_the_column(row, column, fragment):
    with pytest.raises(FormatError, match=fragment.replace("(", r"\(").replace(")", r"\)")) as info:
        multiple_choice(row)
    assert info.value.column == column


# ---------------------------------------------------------------------------------------------------------------------
# Generated datasets in the Hub schemas


@pytest.mark.parametrize(
    "schema, task, columns",
    [
        ("docvqa", "docvqa", {"questionId", "question", "question_types", "image", "docId", "answers", "data_split"}),
        ("textvqa", "textvqa", {"image_id", "question_id", "question", "image", "answers", "ocr_tokens"}),
        ("scienceqa", "multiple_choice", {"image", "question", "choices", "answer", "hint", "subject", "solution"}),
    ],
)
def test_generated_datasets_load_in_their_hub_schema_and_score_their_own_answers(tmp_path, schema, task, columns):
    from datasets import load_dataset

    from vlm_recipes.configs import DataArguments
    from vlm_recipes.data.loading import load_datasets
    from vlm_recipes.data.synthetic import save_generated_dataset

    folder = save_generated_dataset(tmp_path / schema, schema, train_rows=6, test_rows=4)
    raw = load_dataset(str(folder))
    assert columns <= set(raw["train"].column_names) and len(raw["test"]) == 4
    if schema == "textvqa":
        assert all(len(answers) == 10 for answers in raw["train"]["answers"])
    task = get_task(task)
    _, rows, report = load_datasets(
        DataArguments(dataset_name=str(folder), formatter=task.formatter), need_eval=True, format_train=False
    )
    assert report.rejected == 0 and len(rows) == 4
    for row in rows:
        trained_answer = user_text(row["messages"])  # what the recipe trains on scores full marks
        assert task.score(trained_answer, row).values[task.primary_metric] == 1.0
        assert row["images"][0].mode == "RGB" and image_blocks(row["messages"]) == 1
