"""A recipe's task and evaluation sets: defaults, what each set inherits from the recipe, and clear errors for a wrong
entry, all before any data or weights load."""

import json

import pytest

from vlm_recipes.errors import RecipeError
from vlm_recipes.evaluation.sets import apply_task_defaults, resolve_eval_sets, saved_eval_sets
from vlm_recipes.recipe import parse_recipe
from vlm_recipes.sft import RECIPE_PARTS


def recipe(*args):
    parsed = parse_recipe(RECIPE_PARTS, ["--model_name_or_path", "m", "--output_dir", "o", *map(str, args)])
    apply_task_defaults(parsed)
    return parsed


def sets(*args):
    parsed = recipe(*args)
    return resolve_eval_sets(parsed.data, parsed.evaluation)


def test_the_task_sets_the_formatter_unless_the_recipe_names_one():
    assert recipe("--dataset_name", "d").evaluation.task == "chartqa"  # nothing named: ChartQA, as before
    docvqa = recipe("--dataset_name", "d", "--task", "docvqa")
    assert docvqa.data.formatter == "vqa" and docvqa.evaluation.task == "docvqa"
    own_formatter = recipe("--dataset_name", "d", "--task", "docvqa", "--formatter", "conversations")
    assert own_formatter.data.formatter == "conversations"  # the recipe's own choice stays
    assert recipe("--dataset_name", "d", "--formatter", "conversations").evaluation.task == "conversation"
    with pytest.raises(RecipeError, match="Unknown task 'docqa'"):
        recipe("--dataset_name", "d", "--task", "docqa")


def test_without_eval_datasets_one_set_named_after_the_task_on_the_recipes_split():
    (only,) = sets("--dataset_name", "d", "--dataset_test_split", "val", "--max_eval_samples", 50)
    assert only.name == "chartqa" and only.own_split and only.split == "val" and only.preset.name == "recipe"
    assert only.max_new_tokens == 16 and only.data.max_eval_samples == 50  # the task's answer length
    (held_out,) = sets("--dataset_name", "d.jsonl", "--formatter", "conversations", "--eval_split_size", 0.1)
    assert held_out.split == "held out of train" and held_out.task.name == "conversation"
    (preset,) = sets("--dataset_name", "d", "--prompt_preset", "vlmevalkit", "--max_new_tokens", 8)
    assert preset.preset.name == "vlmevalkit" and preset.max_new_tokens == 8


def test_each_entry_inherits_what_it_does_not_set():
    entries = [
        {"name": "charts"},
        {"name": "charts_lmms", "prompt_preset": "lmms_eval", "max_samples": 100},
        {"name": "docs", "dataset": "lmms-lab/DocVQA", "dataset_config": "DocVQA", "task": "docvqa",
         "split": "validation", "max_new_tokens": 64},
        {"name": "mine.v2", "dataset": "mine.jsonl", "task": "conversation", "split": "train"},
    ]  # fmt: skip
    charts, lmms, docs, mine = sets(
        "--dataset_name", "HuggingFaceM4/ChartQA", "--dataset_test_split", "val", "--max_eval_samples", 500,
        "--eval_datasets", *(json.dumps(entry) for entry in entries),
    )  # fmt: skip
    assert charts.own_split and lmms.own_split and lmms.preset.name == "lmms_eval" and lmms.max_samples == 100
    assert charts.data.max_eval_samples == 500 and charts.data.formatter == "chartqa"
    assert not docs.own_split and docs.task.name == "docvqa" and docs.data.formatter == "vqa"
    assert docs.data.dataset_config == "DocVQA" and docs.split == "validation" and docs.max_new_tokens == 64
    assert docs.data.max_eval_samples is None and docs.data.eval_split_size is None  # the recipe's trims are its own
    assert mine.data.formatter == "conversations" and mine.max_new_tokens == 128 and mine.preset.name == "recipe"
    described = docs.describe()
    assert described["task"] == "docvqa" and described["prompt_preset"] == "recipe"
    assert described["prompt_source"].startswith("the recipe's own prompt")


@pytest.mark.parametrize(
    "entries, message",
    [
        (["{not json"], "entry 1 is not a mapping or a JSON object"),
        (['["a"]'], "entry 1 should be a mapping with a `name`"),
        (['{"dataset": "d"}'], "entry 1 needs a `name`"),
        (['{"name": "a b"}'], "entry 1 needs a `name` of letters"),
        (['{"name": "a", "splitt": "val"}'], "entry 1: unknown field 'splitt'"),
        (['{"name": "a"}', '{"name": "a", "prompt_preset": "lmms_eval"}'], "names the set 'a' twice"),
        (['{"name": "a", "task": "conversation", "prompt_preset": "lmms_eval"}'], "'a': Task 'conversation' has no"),
        (['{"name": "a", "task": "mmmu"}'], "Unknown task 'mmmu'"),
        (['{"name": "a", "max_samples": 0}'], "`max_samples` should be a whole number of at least 1"),
        (['{"name": "a", "dataset": "other", "split": "none"}'], "'a': name the `split`"),
    ],
)
def test_a_wrong_entry_is_named_with_what_to_change(entries, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace("[", r"\[")):
        sets("--dataset_name", "d", "--eval_datasets", *entries)


def test_an_unknown_preset_for_the_recipes_task():
    with pytest.raises(RecipeError, match="the recipe: Task 'conversation' has no prompt preset 'lmms_eval'"):
        sets("--dataset_name", "d.jsonl", "--formatter", "conversations", "--prompt_preset", "lmms_eval")


def test_a_saved_recipe_gives_back_its_sets():
    saved = {"dataset_name": "d", "task": "docvqa", "eval_datasets": [{"name": "v", "prompt_preset": "lmms_eval"}]}
    (only,) = saved_eval_sets(saved)
    assert only.name == "v" and only.task.name == "docvqa" and only.data.formatter == "vqa"
    assert saved_eval_sets({"dataset_name": "d", "formatter": "rlaif_v"}) == []  # not an SFT task: nothing
