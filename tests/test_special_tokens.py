"""Special tokens inside a row's text (turn markers, BOS/EOS, image pads, ...) are rejected naming the token, or escaped
to plain text with `special_tokens_in_text: escape`, for SFT rows and for DPO's prompt, chosen and rejected, with every
family's tokenizer. What the escaped text teaches is tested per family in test_labels.py (labelled spans)."""

import json

import pytest
from datasets import Dataset
from PIL import Image

from vlm_recipes.configs import DataArguments, ReliabilityArguments
from vlm_recipes.data.checks import check_training_data
from vlm_recipes.data.loading import load_datasets
from vlm_recipes.data.report import DataReport
from vlm_recipes.data.special_tokens import ESCAPE, escape_special_tokens, find_special_token, special_token_texts
from vlm_recipes.modeling.families import FAMILIES


def test_escaping_breaks_every_token_and_keeps_the_text_readable():
    tokens = ("<|im_end|>", "<|im_start|>", "</s>", "<s>")
    text, escaped = escape_special_tokens("A.<|im_end|>\n<|im_start|>user</s><s><|im_end|>", tokens)
    assert escaped == ["<|im_end|>", "<|im_start|>", "</s>", "<s>"]
    assert text == f"A.<{ESCAPE}|im_end|>\n<{ESCAPE}|im_start|>user<{ESCAPE}/s><{ESCAPE}s><{ESCAPE}|im_end|>"
    assert (
        find_special_token(text, tokens) is None
        and text.replace(ESCAPE, "") == "A.<|im_end|>\n<|im_start|>user</s><s><|im_end|>"
    )
    assert escape_special_tokens(text, tokens) == (text, [])  # nothing left to escape
    assert find_special_token("x </s> then <|im_end|>", tokens) == "</s>"  # the first in the text is named
    assert escape_special_tokens("a<", ("<",)) == ("a<", [])  # a one-character token cannot be broken: ignored


def processor_of(tiny_models, family):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_models(family))


def check(processor, rows, mode, task_rows=None):
    """The data checks on in-memory formatted rows: (kept rows, report as a dict)."""
    report = DataReport()
    report.split("train", "rows", len(rows))
    dataset = Dataset.from_list([{**row, "source_row": f"row {i}"} for i, row in enumerate(rows)])
    kept, _ = check_training_data(
        dataset, None, report, processor, ReliabilityArguments(special_tokens_in_text=mode), None,
    )  # fmt: skip
    return kept, report.to_dict()["train"]


def sft_row(question, answer):
    return {"images": [], "messages": [{"role": "user", "content": [{"type": "text", "text": question}]},
                                       {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}  # fmt: skip


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_special_token_of_every_family_is_rejected_by_name_or_escaped(tiny_models, family):
    processor = processor_of(tiny_models, family)
    tokens = special_token_texts(processor, processor.chat_template)
    tokenizer = processor.tokenizer
    assert set(tokenizer.all_special_tokens) - {t for t in tokenizer.all_special_tokens if len(t) < 2} <= set(tokens)
    rows = [sft_row("Which colour?", f"Red {token} and more") for token in tokens]
    rows += [sft_row(f"Which colour? {token}", "Red") for token in tokens[:3]]  # in the prompt too
    kept, report = check(processor, rows, "reject")
    assert len(kept) == 0
    reasons = report["rejected_by_reason"]
    image_tokens = {"<image>", processor.image_token}  # named as stray image placeholders

    def reason(token):
        return f"{'stray image placeholder' if token in image_tokens else 'special token'} {token} in the text"

    assert {reason: details["count"] for reason, details in reasons.items()} == {
        reason(token): 1 + (token in tokens[:3]) for token in tokens
    }
    first = reasons[reason(tokens[0])]["first_message"]
    assert "row 0, column 'messages': turn 1 (assistant) has" in first and "`special_tokens_in_text: escape`" in first

    kept, report = check(processor, rows, "escape")
    assert len(kept) == len(rows) and report["rejected"] == 0
    special_ids = set(tokenizer.convert_tokens_to_ids(list(tokens)))
    for messages in kept["messages"]:
        for message in messages:
            text = message["content"][0]["text"]
            assert find_special_token(text, tokens) is None
            assert not special_ids & set(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert {kind: d["count"] for kind, d in report["fixed_by_kind"].items()} == {
        f"special token {token} escaped as plain text": 1 + (token in tokens[:3]) for token in tokens
    }


@pytest.mark.parametrize("family", ["qwen2_5_vl", "smolvlm", "llava", "gemma4"])
def test_dpo_prompt_chosen_and_rejected_are_checked_alike(tiny_models, tmp_path, family):
    processor = processor_of(tiny_models, family)
    end = processor.tokenizer.eos_token  # every family has one: `<|im_end|>`, `</s>`, `<eos>`, ...
    Image.new("RGB", (56, 56), "white").save(tmp_path / "a.png")
    pairs = [
        {"prompt": "<image>How many bars?", "chosen": "4", "rejected": "6"},
        {"prompt": f"<image>How many bars?{end}", "chosen": "4", "rejected": "6"},
        {"prompt": "<image>How many bars?", "chosen": f"4{end}", "rejected": "6"},
        {"prompt": "<image>How many bars?", "chosen": "4", "rejected": f"6{end} more"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({**pair, "images": ["a.png"]}) for pair in pairs) + "\n")
    for mode, kept_rows in (("reject", 1), ("escape", 4)):
        train, evaluation, report = load_datasets(DataArguments(dataset_name=str(path), formatter="preference"),
                                                  task="preference")  # fmt: skip
        train, _ = check_training_data(train, evaluation, report, processor,
                                       ReliabilityArguments(special_tokens_in_text=mode), None)  # fmt: skip
        assert len(train) == kept_rows
        split = report.to_dict()["train"]
        if mode == "reject":
            reason = split["rejected_by_reason"][f"special token {end} in the text"]
            assert reason["examples"] == ["line 2", "line 3", "line 4"]
            assert "line 2, column 'prompt'" in reason["first_message"]
        else:
            texts = [m["content"][-1]["text"] for column in ("prompt", "chosen", "rejected") for row in train[column]
                     for m in row]  # fmt: skip
            assert not any(end in text for text in texts) and any(end[0] + ESCAPE in text for text in texts)


def test_an_image_placeholder_inside_an_answer_is_never_learned(tmp_path, tiny_qwen):
    from transformers import AutoProcessor

    Image.new("RGB", (56, 56), "white").save(tmp_path / "a.png")
    row = {"messages": [{"role": "user", "content": "<image>Draw it."}, {"role": "assistant", "content": "Here <image>"}],
           "images": ["a.png", "a.png"]}  # fmt: skip
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    train, evaluation, report = load_datasets(
        DataArguments(dataset_name=str(tmp_path / "d.jsonl"), formatter="conversations")
    )
    for mode in ("reject", "escape"):
        kept, _ = check_training_data(train, evaluation, report, AutoProcessor.from_pretrained(tiny_qwen),
                                      ReliabilityArguments(special_tokens_in_text=mode), None)  # fmt: skip
        assert len(kept) == 0
    assert (
        "turn 1 (assistant) holds an image"
        in report.to_dict()["train"]["rejected_by_reason"]["image in an assistant turn"]["first_message"]
    )
