"""Prompts for generation, left-padded batches, and the training plot."""

import pytest
from PIL import Image

from vlm_recipes.evaluation.generate import (
    encode_prompts,
    generate_answers,
    prompt_messages,
    question_of,
    reference_answers,
)
from vlm_recipes.training.plots import plot_training_log


def text(value):
    return [{"type": "text", "text": value}]


def test_the_prompt_is_the_conversation_without_its_final_answer():
    messages = [
        {"role": "system", "content": text("Be brief.")},
        {"role": "user", "content": [{"type": "image", "text": None}, *text("First?")]},
        {"role": "assistant", "content": text("One.")},
        {"role": "user", "content": text("And the peak?")},
        {"role": "assistant", "content": text("2014")},
    ]
    assert prompt_messages(messages) == messages[:-1]  # earlier answers stay: they are context
    assert prompt_messages(messages[:-1]) == messages[:-1]
    assert question_of(messages) == "And the peak?"
    assert reference_answers({"messages": messages}) == ["2014"]
    assert reference_answers({"messages": messages, "answers": ["2014", "in 2014"]}) == ["2014", "in 2014"]


@pytest.fixture(scope="module")
def tiny_model_and_processor(tiny_qwen):
    from vlm_recipes.configs import ModelArguments
    from vlm_recipes.modeling.loading import load_for_inference

    model, processor, _ = load_for_inference(ModelArguments(model_name_or_path=str(tiny_qwen), dtype="float32"))
    return model, processor


def chart_rows():
    questions = ["How many bars are shown in the chart?", "What is the value of Lamb?", "Which is highest?"]
    sizes = [(120, 90), (64, 64), (160, 100)]  # different image-token counts, so prompts differ in length
    return [
        {
            "images": [Image.new("RGB", size, color)],
            "messages": [
                {"role": "user", "content": [{"type": "image", "text": None}, *text(question)]},
                {"role": "assistant", "content": text("3")},
            ],
        }
        for question, size, color in zip(questions, sizes, ["white", "red", "blue"])
    ]


def test_batches_are_left_padded_and_answer_like_single_rows(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    rows = chart_rows()
    inputs = encode_prompts(processor, rows)
    lengths = inputs["attention_mask"].sum(dim=1)
    assert len(set(lengths.tolist())) == 3  # three prompt lengths...
    assert bool((inputs["attention_mask"][:, -1] == 1).all())  # ...all ending at the last position: left padding
    pad = processor.tokenizer.pad_token_id
    shortest = int(lengths.argmin())
    assert bool((inputs["input_ids"][shortest, : inputs["input_ids"].shape[1] - lengths[shortest]] == pad).all())
    prompt = processor.decode(inputs["input_ids"][0])
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_end|>\n<|im_start|>assistant\n3" not in prompt

    batched = generate_answers(model, processor, rows, batch_size=3, max_new_tokens=6, progress=False)
    alone = [
        generate_answers(model, processor, [row], batch_size=1, max_new_tokens=6, progress=False)[0] for row in rows
    ]
    assert batched == alone
    assert any(batched) and len(set(batched)) > 1  # the random model says something, and not the same thing
    assert not model.training


def test_plot_of_losses_and_evaluation_metrics(tmp_path):
    history = [
        {"loss": 6.0, "step": 1},
        {"loss": 4.0, "step": 2},
        {"eval_loss": 4.5, "step": 2},
        {"eval_relaxed_accuracy": 0.25, "eval_exact_match": 0.125, "step": 2},
        {"loss": 3.0, "step": 4},
        {"eval_relaxed_accuracy": 0.5, "eval_exact_match": 0.25, "step": 4},
    ]
    path = plot_training_log(history, tmp_path / "plot.png", title="run")
    image = Image.open(path)
    assert image.format == "PNG" and image.size[0] > 1.5 * image.size[1]  # two panels side by side
    only_loss = plot_training_log(history[:2], tmp_path / "loss.png")
    assert Image.open(only_loss).size[0] < image.size[0]  # one panel
    assert plot_training_log([{"train_runtime": 1.0, "step": 4}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_greedy_generation_ignores_the_checkpoints_sampling_settings(tiny_model_and_processor):
    from vlm_recipes.evaluation.generate import greedy_generation_config

    model, processor = tiny_model_and_processor
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.7
    try:
        config = greedy_generation_config(model, processor, max_new_tokens=5)
    finally:
        model.generation_config.do_sample, model.generation_config.temperature = False, 1.0
    assert config.do_sample is False and config.max_new_tokens == 5
    assert config.eos_token_id == model.generation_config.eos_token_id
    assert config.pad_token_id == processor.tokenizer.pad_token_id
