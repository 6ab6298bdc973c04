"""The peak-memory estimate counts parameters exactly from the config (meta device), as the loaded model holds them."""

import pytest
from trl import SFTConfig

from vlm_recipes.configs import ModelArguments, TuningArguments
from vlm_recipes.modeling.base_model import load_config
from vlm_recipes.modeling.loading import load_for_training
from vlm_recipes.modeling.memory import GIB, estimate_peak_memory
from vlm_recipes.modeling.setup import resolve_model_setup, setup_for_config


def estimate(config, model_args, tuning=None, **training):
    training_args = SFTConfig(output_dir="unused", use_cpu=True, bf16=False, **training)
    setup = setup_for_config(config, model_args, tuning or TuningArguments(), 1e-4)
    return estimate_peak_memory(setup, training_args, 1500, 1200)


def stored_bytes(model):
    """Bytes the loaded model's parameters occupy, 4-bit quantization constants included."""
    total = 0
    for parameter in model.parameters():
        total += parameter.numel() * parameter.element_size()
        state = getattr(parameter, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if state.state2 is not None:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4 * state.offset.numel()
    return total


@pytest.mark.parametrize("four_bit", [False, True], ids=["lora", "qlora"])
def test_weights_and_trained_parameters_match_the_loaded_model(tiny_qwen, four_bit):
    model_args = ModelArguments(model_name_or_path=str(tiny_qwen), use_peft=True, load_in_4bit=four_bit)
    estimated = estimate(load_config(model_args), model_args)
    model = load_for_training(resolve_model_setup(model_args, TuningArguments(), 1e-4))
    assert estimated.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimated.weights == pytest.approx(stored_bytes(model), rel=1e-3)
    assert (estimated.weights_by_precision["4-bit"] > 0) == four_bit


def qwen2_5_vl_7b_config():
    """Qwen/Qwen2.5-VL-7B-Instruct's published shape (its config.json), built offline."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
            num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
        ),
        vision_config=dict(
            depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
            fullatt_block_indexes=[7, 15, 23, 31], window_size=112,
        ),
        tie_word_embeddings=False,
    )  # fmt: skip


def test_real_size_estimate_from_the_config_alone():
    config = qwen2_5_vl_7b_config()
    qlora = estimate(config, ModelArguments(load_in_4bit=True, use_peft=True), per_device_train_batch_size=4)
    assert qlora.trainable_parameters == 40_370_176  # r=16 on the 7 projections of 28 layers
    assert 6 * GIB < qlora.weights < 7 * GIB  # 4-bit language model, 16-bit vision tower, embeddings and head
    assert qlora.activations_checkpointed < qlora.activations_full
    full = estimate(config, ModelArguments(), TuningArguments(tuning_strategy="full"), per_device_train_batch_size=4)
    assert full.weights == pytest.approx(8_292_166_656 * 2, rel=1e-3)  # every parameter in bf16
    assert full.training_states == pytest.approx(3 * full.weights, rel=1e-3)  # bf16 gradient + two AdamW states
    assert "vision tower trains" in " ".join(full.notes) and full.peak(True) > 3 * qlora.peak(True)
