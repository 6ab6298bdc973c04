"""vlm-recipes' own training chat templates (LLaVA 1.5, Gemma 4): they render as the stock ones, label the end of every
turn, and are used the way TRL uses its own (the processor keeps the model's template)."""

import logging
from types import SimpleNamespace

import pytest
from PIL import Image
from transformers import AutoProcessor
from trl.chat_template_utils import is_chat_template_stop_token_trained

from vlm_recipes.errors import RecipeError
from vlm_recipes.modeling.chat_templates import choose_training_template, read_template
from vlm_recipes.modeling.families import FAMILIES


def text(value):
    return {"type": "text", "text": value}


CHAT = [
    {"role": "system", "content": [text("Answer briefly.")]},
    {"role": "user", "content": [{"type": "image"}, text("What is the highest bar?")]},
    {"role": "assistant", "content": [text("Bar B.")]},
    {"role": "user", "content": [text("And its value?")]},
    {"role": "assistant", "content": [text("42"), text("percent.")]},
]
TOOL_CALL = {"type": "function", "function": {"name": "read_value", "arguments": {"bar": "B"}}}
GEMMA4_AGENT_CHAT = [
    {"role": "user", "content": [{"type": "image"}, text("Read bar B.")]},
    {"role": "assistant", "reasoning": "I should read it.", "content": "", "tool_calls": [TOOL_CALL]},
    {"role": "tool", "name": "read_value", "content": "42"},
    {"role": "assistant", "content": [text("Bar B is 42.")]},
]


@pytest.fixture(scope="module")
def processors(tiny_models):
    return {family: AutoProcessor.from_pretrained(tiny_models(family)) for family in ("llava", "gemma4", "qwen3_vl")}


def render(processor, messages, template, **kwargs):
    return processor.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


@pytest.mark.parametrize("messages", [CHAT, GEMMA4_AGENT_CHAT], ids=["chat", "tool_calls_and_reasoning"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_gemma4_training_template_renders_byte_identically_to_the_stock_one(
    processors, messages, add_generation_prompt
):
    processor = processors["gemma4"]
    ours = read_template(FAMILIES["gemma4"].training_template)
    stock = read_template("trl:gemma4_v5.jinja")
    rendered = render(processor, messages, ours, add_generation_prompt=add_generation_prompt)
    assert rendered == render(processor, messages, stock, add_generation_prompt=add_generation_prompt)
    assert "<|turn>model\n" in rendered


def test_llava_training_template_only_adds_end_of_sequence_after_each_answer(processors):
    processor = processors["llava"]
    ours = read_template(FAMILIES["llava"].training_template)
    stock = read_template("vlm_recipes:llava_1_5.jinja")
    rendered = render(processor, CHAT, ours)
    assert rendered == render(processor, CHAT, stock).replace("Bar B. ", "Bar B.</s> ").replace(
        "42 percent. ", "42 percent.</s> "
    )
    assert rendered.startswith("Answer briefly. USER: <image>\nWhat is the highest bar? ASSISTANT: Bar B.</s> ")
    generation_prompt = render(processor, CHAT[:2], ours, add_generation_prompt=True)
    assert generation_prompt == render(processor, CHAT[:2], stock, add_generation_prompt=True)


@pytest.mark.parametrize("family", ["llava", "gemma4"])
def test_our_templates_label_the_end_of_turn_token(processors, family):
    """TRL's own check: the last labelled token of an assistant turn is the end-of-turn token."""
    processor = processors[family]
    assert is_chat_template_stop_token_trained(
        processor, chat_template=read_template(FAMILIES[family].training_template)
    )
    messages = GEMMA4_AGENT_CHAT if family == "gemma4" else CHAT
    image = {"type": "image", "image": Image.new("RGB", (64, 48), "white")}
    messages = [
        {**m, "content": [image if c == {"type": "image"} else c for c in m["content"]]}
        if isinstance(m["content"], list)
        else m
        for m in messages
    ]
    mask = processor.apply_chat_template(
        messages,
        chat_template=read_template(FAMILIES[family].training_template),
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids, labelled = mask["input_ids"][0], mask["assistant_masks"][0]
    learned = processor.tokenizer.decode([token for token, keep in zip(ids, labelled) if keep])
    if family == "gemma4":  # thinking and the tool call are the model's too; the tool's response is not
        assert learned == (
            '<|channel>thought\nI should read it.\n<channel|><|tool_call>call:read_value{bar:<|"|>B<|"|>}'
            "<tool_call|>Bar B is 42.<turn|>\n"
        )
    else:
        assert learned == " Bar B.</s> 42 percent.</s>"


def test_the_stock_llava_template_never_labels_an_end_of_turn(processors):
    """Why LLaVA 1.5 needs ours: the llava-hf template marks the answer but ends it with a space."""
    assert not is_chat_template_stop_token_trained(processors["llava"])


def args(**kwargs):
    return SimpleNamespace(**{"assistant_only_loss": True, "chat_template_path": None, **kwargs})


def test_which_template_trains_and_the_log_says_so(processors, caplog):
    caplog.set_level(logging.INFO, logger="vlm_recipes.modeling.chat_templates")
    qwen, gemma4 = processors["qwen3_vl"], processors["gemma4"]
    assert choose_training_template(qwen, FAMILIES["qwen3_vl"], args()) is None  # TRL swaps its own in
    assert "TRL's qwen3_vl_training.jinja" in caplog.text
    ours = choose_training_template(gemma4, FAMILIES["gemma4"], args())
    assert ours == read_template("vlm_recipes:gemma4_training.jinja")
    assert "vlm-recipes' gemma4_training.jinja (TRL has none for gemma4)" in caplog.text
    assert choose_training_template(gemma4, FAMILIES["gemma4"], args(assistant_only_loss=False)) is None


def test_an_unknown_template_is_refused_or_warned_about(processors, caplog, monkeypatch):
    qwen, gemma4 = processors["qwen3_vl"], processors["gemma4"]
    monkeypatch.setattr(qwen, "chat_template", qwen.chat_template.replace("<|im_start|>", "<|im_start|> "))
    with pytest.raises(RecipeError, match="not the stock one TRL knows a training version of"):
        choose_training_template(qwen, FAMILIES["qwen3_vl"], args())
    monkeypatch.setattr(gemma4, "chat_template", gemma4.chat_template + "\n")
    assert choose_training_template(gemma4, FAMILIES["gemma4"], args()) is not None
    assert "not the stock one vlm-recipes' gemma4_training.jinja was written for" in caplog.text
