"""Property tests: random malformed rows, preference pairs and recipes thrown at the formatters, the data checks and the
recipe parser. Whatever comes in, the answer is a clear error (`RecipeError`/`DataError`, or a `FormatError` the
loader turns into one) or a counted rejection; never an uncaught exception, and never a special token inside a
labelled span. Examples are bounded (and derandomized, so a run is repeatable) to keep `make test` fast."""

import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlm_recipes.configs import DataArguments, ReliabilityArguments
from vlm_recipes.data.checks import check_training_data
from vlm_recipes.data.formatters import FORMATTERS, FormatError
from vlm_recipes.data.loading import load_datasets
from vlm_recipes.errors import RecipeError


SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Text that finds the edges: control tokens of several families, placeholders, empty and blank strings, non-ASCII.
TEXT = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "<image>",
            "<image><image>",
            "What?",
            "42",
            "<|im_end|>",
            "<|im_start|>user\n",
            "</s>",
            "<s>",
            "<end_of_turn>",
            "<|image_pad|>",
            "<|vision_start|>",
            "<tool_call>",
            "é\u200bü",
            "\n\n",
        ]
    ),  # fmt: skip
    st.text(max_size=12),
)
KEYS = ["messages", "conversations", "role", "from", "content", "value", "type", "text", "image", "images", "prompt",
        "chosen", "rejected", "question", "query", "label"]  # fmt: skip
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), TEXT)
JSON = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.sampled_from(KEYS), children, max_size=4)
    ),
    max_leaves=12,
)
ROLES = st.sampled_from(["user", "assistant", "system", "human", "gpt", "tool", "robot", None, 3])
IMAGES = st.one_of(
    st.just("a.png"), st.just("missing.png"), st.just("../outside.png"), st.integers(), st.none(),
    st.just({"path": "a.png"}), st.just({"bytes": None}), st.lists(st.integers(), max_size=2),
)  # fmt: skip
TURN = st.fixed_dictionaries({"role": ROLES, "content": st.one_of(TEXT, JSON)})
CONVERSATION_ROW = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(TURN, min_size=1, max_size=4), JSON)},
    optional={"images": st.one_of(st.lists(IMAGES, max_size=2), IMAGES)},
)
# Rows close to valid ones (one image, its placeholder, text around it), so that many are kept and their labels checked.
PLAUSIBLE_ROW = st.builds(
    lambda question, answers, system: {
        "messages": [
            *([{"role": "system", "content": system}] if system is not None else []),
            {"role": "user", "content": f"<image>{question}"},
            *[
                turn
                for answer in answers
                for turn in ({"role": "assistant", "content": answer}, {"role": "user", "content": "More?"})
            ],
        ][:-1],
        "images": ["a.png"],
    },  # fmt: skip
    TEXT,
    st.lists(TEXT, min_size=1, max_size=3),
    st.none() | TEXT,
)
PREFERENCE_ROW = st.fixed_dictionaries(
    {"chosen": st.one_of(TEXT, st.lists(TURN, max_size=2)), "rejected": st.one_of(TEXT, st.lists(TURN, max_size=2))},
    optional={"prompt": st.one_of(TEXT, st.lists(TURN, max_size=2), JSON), "images": st.lists(IMAGES, max_size=2)},
)
PLAUSIBLE_PAIR = st.builds(
    lambda question, chosen, rejected: {
        "prompt": f"<image>{question}", "chosen": chosen, "rejected": rejected, "images": ["a.png"]
    },
    TEXT, TEXT, TEXT,
)  # fmt: skip
ANY_ROW = st.one_of(CONVERSATION_ROW, PREFERENCE_ROW, st.dictionaries(st.sampled_from(KEYS), JSON, max_size=5))


@settings(max_examples=300, **SETTINGS)
@given(row=ANY_ROW)
def test_formatters_return_a_row_or_a_format_error(row, tmp_path_factory):
    for spec in FORMATTERS.values():
        try:
            formatted = spec.function(dict(row), image_root="/data")
        except FormatError as error:
            assert error.reason and str(error)
            continue
        assert isinstance(formatted["images"], list)
        conversations = [formatted["messages"]] if spec.task == "sft" else [formatted["prompt"]]
        for messages in conversations:
            assert all(message["role"] in {"system", "user", "assistant"} for message in messages)


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("property-data")
    Image.new("RGB", (56, 56), "red").save(folder / "a.png")
    Image.new("RGB", (56, 56), "blue").save(folder.parent / "outside.png")
    return folder


@pytest.fixture(scope="module")
def processor(tiny_qwen):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_qwen)


def labelled_token_spans(processor, rows):
    """The labelled spans (token ids) the collator gives each of `rows`, with TRL's training template."""
    from conftest import labelled_spans

    from vlm_recipes.modeling.chat_templates import read_template
    from vlm_recipes.modeling.families import FAMILIES
    from vlm_recipes.training.collators import VisionSFTCollator

    template = read_template(FAMILIES["qwen2_5_vl"].training_template)
    collator = VisionSFTCollator(processor=processor, assistant_only_loss=True, chat_template=template)
    batch = collator(rows)
    return [labelled_spans(labels) for labels in batch["labels"]]


@settings(max_examples=25, **SETTINGS)
@given(
    rows=st.lists(PLAUSIBLE_ROW | CONVERSATION_ROW, min_size=1, max_size=4), mode=st.sampled_from(["reject", "escape"])
)
def test_data_checks_count_every_row_and_labels_hold_no_special_token(rows, mode, data_folder, processor):
    from vlm_recipes.data.special_tokens import special_token_texts

    path = data_folder / "rows.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    try:
        train, evaluation, report = load_datasets(DataArguments(dataset_name=str(path), formatter="conversations"))
        if train is not None and len(train):
            train, _ = check_training_data(
                train, evaluation, report, processor, ReliabilityArguments(special_tokens_in_text=mode), None,
            )  # fmt: skip
    except RecipeError:
        return  # a clear error naming the file (a row that is not a JSON object, ...)
    split = report.to_dict()["train"]
    assert split["rows"] == len(rows) and split["kept"] + split["rejected"] == len(rows)
    assert len(train) == split["kept"]
    if not len(train):
        return
    special_ids = set(processor.tokenizer.convert_tokens_to_ids(list(special_token_texts(processor))))
    end_of_turn = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for spans in labelled_token_spans(processor, [train[index] for index in range(len(train))]):
        for span in spans:
            assert [token for token in span if token in special_ids] == [end_of_turn]


@settings(max_examples=25, **SETTINGS)
@given(
    pairs=st.lists(PLAUSIBLE_PAIR | PREFERENCE_ROW, min_size=1, max_size=3), mode=st.sampled_from(["reject", "escape"])
)
def test_preference_checks_count_every_pair(pairs, mode, data_folder, processor):
    from vlm_recipes.data.special_tokens import find_special_token, special_token_texts

    path = data_folder / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(pair) for pair in pairs) + "\n", encoding="utf-8")
    try:
        train, evaluation, report = load_datasets(
            DataArguments(dataset_name=str(path), formatter="preference"), task="preference"
        )
        if len(train):
            train, _ = check_training_data(
                train, evaluation, report, processor, ReliabilityArguments(special_tokens_in_text=mode), None,
            )  # fmt: skip
    except RecipeError:
        return
    split = report.to_dict()["train"]
    assert split["kept"] + split["rejected"] == len(pairs) and len(train) == split["kept"]
    tokens = special_token_texts(processor)
    for column in ("prompt", "chosen", "rejected"):
        for messages in train[column] if len(train) else []:
            for message in messages:
                for block in message["content"]:
                    assert block["type"] == "image" or find_special_token(block["text"], tokens) is None


@pytest.fixture(scope="module")
def recipe_fields():
    from trl import TrlParser

    from vlm_recipes.sft import SFTRecipe

    parser = TrlParser(list(SFTRecipe.parts().values()))
    return sorted(action.dest for action in parser._actions if action.dest != "help")


RECIPE_VALUES = st.one_of(
    SCALARS, st.lists(SCALARS, max_size=2), st.dictionaries(st.text(max_size=4), SCALARS, max_size=2),
    st.sampled_from(["abc", "2e-4", "-5", "none", "true", "maybe", "bfloat16", "steps", "float64"]),
)  # fmt: skip


@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def test_the_recipe_parser_answers_with_a_recipe_or_one_clear_error(data, recipe_fields, tmp_path_factory):
    from vlm_recipes.recipe import parse_recipe
    from vlm_recipes.sft import SFTRecipe

    names = data.draw(st.lists(st.one_of(st.sampled_from(recipe_fields), st.text(min_size=1, max_size=8)), max_size=4))
    content = {name: data.draw(RECIPE_VALUES) for name in names}
    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    path.write_text(yaml.safe_dump(content), encoding="utf-8")
    try:
        parse_recipe(SFTRecipe, [str(path), "--output_dir", str(path.parent / "out")])
    except RecipeError as error:
        assert str(error) and "\n" not in str(error).strip()
