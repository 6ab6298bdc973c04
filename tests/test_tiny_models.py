"""The tiny-model builder makes ordinary model folders: they reload with the Auto classes and behave like the real ones."""

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlm_recipes.modeling.chat_templates import read_template
from vlm_recipes.modeling.families import FAMILIES, get_family
from vlm_recipes.testing.tiny_models import build_tiny_model, trl_chat_template


QWEN_FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_tiny_qwen_reloads_and_matches_the_real_conventions(tiny_models, family):
    folder = tiny_models(family)
    assert {"config.json", "model.safetensors", "chat_template.jinja", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert not list(folder.glob("*.bin"))  # safetensors only
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    tokenizer = processor.tokenizer
    assert get_family(model).name == family
    # Special-token ids in the config are the tokenizer's own, and each special token stays one token after reload.
    for token, config_id in [
        ("<|image_pad|>", model.config.image_token_id),
        ("<|vision_start|>", model.config.vision_start_token_id),
        ("<|vision_end|>", model.config.vision_end_token_id),
        ("<|im_end|>", model.config.text_config.eos_token_id),
    ]:
        assert tokenizer.convert_tokens_to_ids(token) == config_id
        assert tokenizer(token, add_special_tokens=False).input_ids == [config_id]
    assert (
        tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>" and tokenizer.bos_token is None
    )
    # The stock chat template, byte for byte (how TRL recognises it and swaps in its training version).
    assert processor.chat_template == trl_chat_template("qwen2_5_vl.jinja")
    # The real checkpoints' image-processor settings.
    assert processor.image_processor.size["longest_edge"] == 12845056
    assert processor.image_processor.size["shortest_edge"] == 3136
    assert (processor.image_processor.patch_size, processor.image_processor.merge_size) == (14, 2)
    generation = json.loads((folder / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]


# Per family: the stock chat template the real checkpoints ship, and the config fields that name special tokens.
STOCK_TEMPLATE = {
    "qwen2_vl": "trl:qwen2_5_vl.jinja",
    "qwen2_5_vl": "trl:qwen2_5_vl.jinja",
    "qwen3_vl": "trl:qwen3_vl.jinja",
    "qwen3_vl_moe": "trl:qwen3_vl.jinja",
    "qwen3_5": "trl:qwen3_5_think.jinja",
    "smolvlm": "trl:smolvlm.jinja",
    "llava": "vlm_recipes:llava_1_5.jinja",
    "llava_next": "trl:llava_next.jinja",
    "gemma3": "trl:gemma3.jinja",
    "gemma4": "trl:gemma4_v5.jinja",
}
QWEN_TOKEN_FIELDS = {"image_token_id": "<|image_pad|>", "vision_start_token_id": "<|vision_start|>"}
TOKEN_FIELDS = {
    **dict.fromkeys(["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5"], QWEN_TOKEN_FIELDS),
    "smolvlm": {"image_token_id": "<image>"},
    "llava": {"image_token_index": "<image>"},
    "llava_next": {"image_token_index": "<image>"},
    "gemma3": {
        "image_token_index": "<image_soft_token>",
        "boi_token_index": "<start_of_image>",
        "eoi_token_index": "<end_of_image>",
    },
    "gemma4": {"image_token_id": "<|image|>", "boi_token_id": "<|image>", "eoi_token_id": "<image|>"},
}
END_OF_TURN = {
    **dict.fromkeys(["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5"], "<|im_end|>"),
    "smolvlm": "<end_of_utterance>",
    "llava": "</s>",
    "llava_next": "</s>",
    "gemma3": "<end_of_turn>",
    "gemma4": "<turn|>",
}


def test_every_family_has_its_expectations():
    assert set(STOCK_TEMPLATE) == set(TOKEN_FIELDS) == set(END_OF_TURN) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_tiny_family_reloads_with_its_real_conventions_and_learns(tiny_models, family):
    from tokenizers import Tokenizer

    folder = tiny_models(family)
    assert not list(folder.glob("*.bin")) and (folder / "model.safetensors").exists()
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(folder)
    tokenizer = processor.tokenizer
    assert get_family(model).name == family
    assert processor.chat_template == read_template(STOCK_TEMPLATE[family])  # byte for byte, as TRL compares
    # Config ids are the tokenizer's own, each special token stays one token, and the reloaded tokenizer encodes
    # exactly as the saved tokenizer.json does (transformers rebuilds some tokenizer classes on load).
    for field, token in TOKEN_FIELDS[family].items():
        assert getattr(model.config, field) == tokenizer.convert_tokens_to_ids(token), field
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN[family])
    assert tokenizer(END_OF_TURN[family], add_special_tokens=False).input_ids == [end_of_turn]
    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    assert end_of_turn in (eos if isinstance(eos, list) else [eos])  # generation stops at the end of a turn
    text = "What is the highest bar? The answer is 42 percent, in 2003."
    saved = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert tokenizer(text, add_special_tokens=False).input_ids == saved

    # The processor's image-token count matches the vision tower's output (a mismatch only shows at forward), the loss
    # is finite, gradients reach the vision tower, and one optimizer step lowers the loss on the same batch.
    image = Image.new("RGB", (300, 200), (200, 30, 30))
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Value?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "42"}]},
    ]
    batch = processor.apply_chat_template([messages], tokenize=True, return_dict=True, return_tensors="pt")
    image_token = getattr(model.config, next(iter(TOKEN_FIELDS[family])))
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == image_token, -100)  # as the collator does
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = model(**batch, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    family_row = FAMILIES[family]
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0
        for name, p in model.named_parameters()
        if family_row.part_of(name) == "vision_tower"
    )
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # a short step along the gradient lowers the loss
    optimizer.step()
    with torch.no_grad():
        assert model(**batch, labels=labels).loss < loss


def test_tiny_model_trains_and_counts_image_tokens_like_the_processor(tiny_qwen):
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen)
    processor = AutoProcessor.from_pretrained(tiny_qwen)
    image = Image.new("RGB", (300, 200), (200, 30, 30))
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Value?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "42"}]},
    ]
    batch = processor.apply_chat_template([messages], tokenize=True, return_dict=True, return_tensors="pt")
    image_tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
    # The processor's own resize rule predicts the count without running the model.
    assert image_tokens == processor._get_num_multimodal_tokens(image_sizes=[(200, 300)]).num_image_tokens[0]
    output = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0  # gradients reach the vision tower


def test_real_size_vocabulary_option(tmp_path):
    folder = build_tiny_model("qwen2_5_vl", tmp_path / "big_vocab", vocab_size=4096)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert model.get_input_embeddings().weight.shape[0] == 4096
    assert model.lm_head.weight.shape[0] == 4096


def test_builder_never_overwrites_a_foreign_folder(tmp_path):
    from vlm_recipes.errors import RecipeError

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(RecipeError, match="not a tiny model folder"):
        build_tiny_model("qwen2_5_vl", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
