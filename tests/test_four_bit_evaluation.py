"""QLoRA with evaluation during training on a CPU: an evaluation must not leave the 4-bit weights in bitsandbytes'
inference-only layout (`compat.keep_4bit_weights_trainable`, applied by `modeling.base_model.load_model`).

This machine's CPU may lack AVX512-BF16, where bitsandbytes 0.50.2 never repacks; the tests make bitsandbytes believe
it has it (`has_avx512bf16`, read when a 4-bit layer is built), as such a CPU reports."""

import bitsandbytes.nn.modules as bnb_modules
import torch
from bitsandbytes.nn import Linear4bit
from PIL import Image

from vlm_recipes.configs import ModelArguments, TuningArguments
from vlm_recipes.modeling.loading import load_for_training
from vlm_recipes.modeling.setup import resolve_model_setup


def packed_layers(model):
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, Linear4bit) and getattr(module.weight.quant_state, "packing_format_for_cpu", False)
    ]


def test_the_cause_an_evaluation_forward_repacks_a_4bit_layer_for_inference_only(monkeypatch):
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    layer = Linear4bit(64, 64, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.load_state_dict(torch.nn.Linear(64, 64).state_dict())
    layer = layer.to("cpu")  # quantizes the weight
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))
    layer.train()
    # bitsandbytes keeps the inference layout after train(): the next training forward takes the kernel without backward
    assert layer.weight.quant_state.packing_format_for_cpu


def lora_gradients(model, inputs):
    model.zero_grad()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_a_qlora_model_loaded_for_training_keeps_its_layout_through_an_evaluation(tiny_qwen, monkeypatch):
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    model_args = ModelArguments(model_name_or_path=str(tiny_qwen), dtype="bfloat16", lora_dropout=0.0)
    setup = resolve_model_setup(model_args, TuningArguments(tuning_strategy="qlora"), 1e-4)
    model, processor = load_for_training(setup), setup.load_processor()
    layers = [module for module in model.modules() if isinstance(module, Linear4bit)]
    assert layers and not any(layer.support_avx512bf16_for_cpu for layer in layers)

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many bars?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.new("RGB", (56, 56), "white")], return_tensors="pt")
    model.train()
    before = lora_gradients(model, inputs)
    model.eval()  # what an evaluation during training does
    with torch.no_grad():
        model(**inputs)
    model.train()
    after = lora_gradients(model, inputs)
    assert packed_layers(model) == []
    assert before.keys() == after.keys() and len(before) > 0
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_inference_loading_keeps_the_faster_inference_layout(tiny_qwen, monkeypatch):
    from vlm_recipes.modeling.base_model import load_model
    from vlm_recipes.modeling.families import FAMILIES

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    model_args = ModelArguments(model_name_or_path=str(tiny_qwen), dtype="bfloat16", load_in_4bit=True)
    model = load_model(model_args, FAMILIES["qwen2_5_vl"], for_inference=True)
    assert all(m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, Linear4bit))
