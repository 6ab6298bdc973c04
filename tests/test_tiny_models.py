"""The tiny-model builder makes ordinary model folders: they reload with the Auto classes and behave like the real ones."""

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlm_recipes.modeling.families import get_family
from vlm_recipes.modeling.tiny import build_tiny_model, trl_chat_template


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
