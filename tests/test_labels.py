"""Collated labels: exactly the assistant answers (and their end-of-turn token) are learned; nothing else."""

import json

import pytest
from PIL import Image

from vlm_recipes.recipe import parse_recipe
from vlm_recipes.sft import RECIPE_PARTS, build_trainer


def labelled_spans(labels):
    """Contiguous runs of labelled positions, as lists of token ids."""
    spans, current = [], []
    for token in labels.tolist():
        if token == -100:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(token)
    return spans + ([current] if current else [])


def trainer_for(model_dir, dataset, output_dir, *extra):
    recipe = parse_recipe(
        RECIPE_PARTS,
        [
            "--model_name_or_path", str(model_dir), "--dataset_name", str(dataset), "--output_dir", str(output_dir),
            "--use_peft", "true", "--use_cpu", "true", "--bf16", "false", "--dtype", "float32", "--report_to", "none",
            *extra,
        ],
    )  # fmt: skip
    return build_trainer(recipe)


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


def test_every_assistant_turn_of_a_three_turn_conversation_is_labelled(tiny_qwen, tmp_path):
    Image.new("RGB", (56, 56), "green").save(tmp_path / "g.png")
    answers = ["A green square.", "Fifty-six pixels.", "No, it is plain."]
    turns = []
    for question, answer in zip(["<image>What is this?", "How wide is it?", "Any text on it?"], answers):
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"conversations": turns, "image": "g.png"}) + "\n")

    trainer = trainer_for(tiny_qwen, tmp_path / "chat.jsonl", tmp_path / "out", "--formatter", "conversations")
    batch = trainer.data_collator([trainer.train_dataset[0]])
    tokenizer = trainer.processing_class.tokenizer
    spans = labelled_spans(batch["labels"][0])
    assert [tokenizer.decode(span) for span in spans] == [f"{answer}<|im_end|>\n" for answer in answers]
    assert sum(len(span) for span in spans) == int((batch["labels"][0] != -100).sum())


@pytest.mark.parametrize("setting", [["--assistant_only_loss", "false"]])
def test_the_recipe_can_still_train_on_everything(tiny_qwen, chartqa_dir, tmp_path, setting):
    trainer = trainer_for(tiny_qwen, chartqa_dir, tmp_path / "out", *setting)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    labels, mask = batch["labels"][0], batch["attention_mask"][0]
    assert (labels[mask == 1] != -100).all()
