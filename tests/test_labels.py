"""Collated labels: exactly the assistant answers (and their end-of-turn token) are learned; nothing else."""

import json

import pytest
from conftest import labelled_spans, trainer_for
from PIL import Image

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
QUESTIONS = ["<image>What is this?", "How wide is it?", "Any text on it?"]
ANSWERS = ["A green square.", "Fifty-six pixels.", "No, it is plain."]


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
        model_dir, three_turn_chat, tmp_path / "out", "--formatter", "conversations", "--system_prompt", SYSTEM
    )
    batch = trainer.data_collator([trainer.train_dataset[0]])
    tokenizer = trainer.processing_class.tokenizer
    input_ids, labels = batch["input_ids"][0], batch["labels"][0]
    spans = labelled_spans(labels)
    assert [tokenizer.decode(span) for span in spans] == [ASSISTANT_TURN[family].format(a) for a in ANSWERS]
    labelled = labels != -100
    assert (input_ids[labelled] == labels[labelled]).all()  # the tokens themselves, not shifted
    image_token = getattr(trainer.model.config, "image_token_id", None) or trainer.model.config.image_token_index
    assert (input_ids == image_token).any() and not labelled[input_ids == image_token].any()
    prompt = tokenizer.decode(input_ids[~labelled])
    assert SYSTEM in prompt and all(question.removeprefix("<image>") in prompt for question in QUESTIONS)
    # The processor keeps (and would save) the model's own template; the collator renders with the training one.
    assert trainer.processing_class.chat_template == (model_dir / "chat_template.jinja").read_text(encoding="utf-8")


@pytest.mark.parametrize("setting", [["--assistant_only_loss", "false"]])
def test_the_recipe_can_still_train_on_everything(tiny_qwen, chartqa_dir, tmp_path, setting):
    trainer = trainer_for(tiny_qwen, chartqa_dir, tmp_path / "out", *setting)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    labels, mask = batch["labels"][0], batch["attention_mask"][0]
    assert (labels[mask == 1] != -100).all()
