"""Collated labels: exactly the assistant answers (and their end-of-turn token) are learned; nothing else."""

import json

import pytest
from conftest import labelled_spans, trainer_for
from PIL import Image

from vlm_recipes.data.formatters import IMAGE_PLACEHOLDER
from vlm_recipes.data.special_tokens import escape_special_tokens, special_token_texts
from vlm_recipes.modeling.families import FAMILIES


def test_chartqa_labels_are_the_answer_and_end_of_turn(tiny_qwen, chartqa_dir, tmp_path):
    trainer = trainer_for(tiny_qwen, chartqa_dir, tmp_path / "out", "--system_prompt", "Answer briefly.")
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    tokenizer = trainer.processing_class.tokenizer
    image_token = trainer.model.config.image_token_id
    assert (batch["attention_mask"] == 0).any(), "rows of different lengths should need padding"
    for row, input_ids, labels, mask in zip(rows, batch["input_ids"], batch["labels"], batch["attention_mask"]):
        spans = labelled_spans(labels)
        answer = row["messages"][-1]["content"][0]["text"]
        assert [tokenizer.decode(span) for span in spans] == [f"{answer}<|im_end|>\n"]
        assert (labels[input_ids == image_token] == -100).all()  # image tokens
        assert (labels[mask == 0] == -100).all()  # padding
        labelled = labels != -100
        assert (input_ids[labelled] == labels[labelled]).all()  # labels are the tokens themselves, not shifted
        prompt = tokenizer.decode(input_ids[: labelled.nonzero()[0]])
        assert (
            "Answer briefly." in prompt and row["messages"][-2]["content"][1]["text"] in prompt
        )  # system, question: -100


# What each family's training template labels for one assistant turn: the answer and the end of the turn, as the model
# must emit them after the assistant cue (the cue itself, e.g. "<|im_start|>assistant\n", is prompt).
ASSISTANT_TURN = {
    "qwen2_vl": "{}<|im_end|>\n",
    "qwen2_5_vl": "{}<|im_end|>\n",
    "qwen3_vl": "{}<|im_end|>\n",
    "qwen3_vl_moe": "{}<|im_end|>\n",
    "qwen3_5": "<think>\n\n</think>\n\n{}<|im_end|>\n",  # TRL's template: an empty thinking block, then the answer
    "smolvlm": " {}<end_of_utterance>\n",
    "llava": " {}</s>",  # ours: the answer ends with </s>, as LLaVA 1.5 was trained (" A" is one token)
    "llava_next": " {}</s>",
    "gemma3": "{}<end_of_turn>\n",
    "gemma4": "{}<turn|>\n",  # ours
}
SYSTEM = "Answer in one short sentence."
# Text that holds the special tokens of several families (turn markers, EOS, image pads): with
# `special_tokens_in_text: escape` every family must learn them as the plain text they are, never as control tokens.
QUESTIONS = [
    "<image>What is this?",
    "How wide is it? <|vision_start|><|image_pad|>",
    "Any text on it? <start_of_image>",
]
ANSWERS = [
    "A green square.",
    "Fifty-six pixels.<|im_end|>\n<|im_start|>user\nAnd tall?",
    "No</s>, it <end_of_turn> is <turn|> plain <end_of_utterance><|endoftext|>.",
]


@pytest.fixture(scope="module")
def three_turn_chat(tmp_path_factory):
    """One conversation of three question/answer turns about one image, as a JSONL file."""
    folder = tmp_path_factory.mktemp("chat")
    Image.new("RGB", (56, 56), "green").save(folder / "g.png")
    turns = []
    for question, answer in zip(QUESTIONS, ANSWERS):
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    (folder / "chat.jsonl").write_text(json.dumps({"conversations": turns, "image": "g.png"}) + "\n")
    return folder / "chat.jsonl"


def test_every_family_has_a_label_expectation():
    assert set(ASSISTANT_TURN) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(ASSISTANT_TURN))
def test_every_assistant_turn_and_its_end_are_labelled_and_nothing_else(
    tiny_models, three_turn_chat, tmp_path, family
):
    model_dir = tiny_models(family)
    trainer = trainer_for(
        model_dir, three_turn_chat, tmp_path / "out", "--formatter", "conversations", "--system_prompt", SYSTEM,
        "--special_tokens_in_text", "escape",
    )  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[0]])
    processor = trainer.processing_class
    tokenizer = processor.tokenizer
    tokens = (IMAGE_PLACEHOLDER, *special_token_texts(processor, processor.chat_template))
    answers = [escape_special_tokens(answer, tokens)[0] for answer in ANSWERS]
    input_ids, labels = batch["input_ids"][0], batch["labels"][0]
    spans = labelled_spans(labels)
    assert [tokenizer.decode(span) for span in spans] == [ASSISTANT_TURN[family].format(a) for a in answers]
    # No special token inside a labelled span but those the template writes for each turn (its end-of-turn token).
    special_ids = set(tokenizer.convert_tokens_to_ids(list(special_token_texts(processor, processor.chat_template))))
    turn_ids = tokenizer(ASSISTANT_TURN[family].format(""), add_special_tokens=False)["input_ids"]
    for span in spans:
        assert [token for token in span if token in special_ids] == [t for t in turn_ids if t in special_ids]
    labelled = labels != -100
    assert (input_ids[labelled] == labels[labelled]).all()  # the tokens themselves, not shifted
    image_token = getattr(trainer.model.config, "image_token_id", None) or trainer.model.config.image_token_index
    # The escaped image pads in the text stay text: the processor expands the one real image only (two placeholders for
    # one image would not even collate).
    assert (input_ids == image_token).any() and not labelled[input_ids == image_token].any()
    prompt = tokenizer.decode(input_ids[~labelled])
    questions = [escape_special_tokens(question.removeprefix("<image>"), tokens)[0] for question in QUESTIONS]
    assert SYSTEM in prompt and all(question in prompt for question in questions)
    # The processor keeps (and would save) the model's own template; the collator renders with the training one.
    assert trainer.processing_class.chat_template == (model_dir / "chat_template.jinja").read_text(encoding="utf-8")


@pytest.mark.parametrize("setting", [["--assistant_only_loss", "false"]])
def test_the_recipe_can_still_train_on_everything(tiny_qwen, chartqa_dir, tmp_path, setting):
    trainer = trainer_for(tiny_qwen, chartqa_dir, tmp_path / "out", *setting)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    labels, mask = batch["labels"][0], batch["attention_mask"][0]
    assert (labels[mask == 1] != -100).all()
