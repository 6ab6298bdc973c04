"""Prompts for generation, left-padded batches, and the training plot."""

import pytest
from PIL import Image

from vlm_recipes.evaluation.generate import encode_prompts, generate_answers, prompt_lengths
from vlm_recipes.evaluation.runner import generation_order
from vlm_recipes.tasks.base import prompt_messages, question_of, reference_answers
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
    assert question_of({"messages": messages}) == "And the peak?"
    assert question_of({"messages": messages, "question": "Peak year?"}) == "Peak year?"  # the formatter's own
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

    # The prompt lengths the rows are sorted by (text + image tokens, from image sizes alone) are the attention mask's
    # but for the generation prompt the template adds to every row alike.
    counted = prompt_lengths(processor, rows)
    assert len({length - count for length, count in zip(lengths.tolist(), counted)}) == 1 and len(set(counted)) == 3

    batched = generate_answers(model, processor, rows, batch_size=3, max_new_tokens=6, progress=False)
    alone = [
        generate_answers(model, processor, [row], batch_size=1, max_new_tokens=6, progress=False)[0] for row in rows
    ]
    assert batched == alone
    assert any(batched) and len(set(batched)) > 1  # the random model says something, and not the same thing
    assert not model.training


def test_rows_are_generated_longest_first_and_dealt_out_to_processes():
    lengths = [5, 90, 40, 70, 10, 60, 20]
    assert generation_order(lengths, 1, 0) == [1, 3, 5, 2, 6, 4, 0]  # one process: every row, longest first
    shares = [generation_order(lengths, 3, process) for process in range(3)]
    assert shares == [[1, 2, 0], [3, 6, 6], [5, 4, 4]]  # dealt in turn; short shares end with their last row again
    assert {index for share in shares for index in share} == set(range(len(lengths)))
    assert generation_order([7], 2, 1) == [0] and generation_order([], 2, 0) == []


def test_plot_of_losses_and_evaluation_metrics(tmp_path):
    history = [
        {"loss": 6.0, "step": 1},
        {"loss": 4.0, "step": 2},
        {"eval_loss": 4.5, "step": 2},
        {"eval_chartqa/relaxed_accuracy": 0.25, "eval_docs/anls": 0.125, "step": 2},
        {"loss": 3.0, "step": 4},
        {"eval_chartqa/relaxed_accuracy": 0.5, "eval_docs/anls": 0.25, "step": 4},
    ]
    keys = ("eval_chartqa/relaxed_accuracy", "eval_docs/anls")
    path = plot_training_log(history, tmp_path / "plot.png", metric_keys=keys, title="run")
    image = Image.open(path)
    assert image.format == "PNG" and image.size[0] > 1.5 * image.size[1]  # two panels side by side
    only_loss = plot_training_log(history, tmp_path / "loss.png")  # no evaluation metrics named: losses only
    assert Image.open(only_loss).size[0] < image.size[0]  # one panel
    assert plot_training_log([{"train_runtime": 1.0, "step": 4}], tmp_path / "none.png", metric_keys=keys) is None
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


def test_a_dpo_adapter_on_a_merged_sft_adapter_loads_merges_and_is_refused_in_4_bit(tiny_qwen, tmp_path):
    """The layout of a DPO run with `reference: sft_merged`: its adapter applies on top of base + the SFT adapter in
    `sft_adapter/`. Inference and merge give base + SFT merged + DPO adapter, not base + DPO adapter."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForImageTextToText

    from vlm_recipes.configs import ModelArguments
    from vlm_recipes.errors import RecipeError
    from vlm_recipes.merge import merge
    from vlm_recipes.modeling.loading import SFT_ADAPTER_COPY, load_for_inference

    def base():
        return AutoModelForImageTextToText.from_pretrained(tiny_qwen, dtype=torch.float32)

    def save_random_adapter(model, folder, seed):  # LoRA B not zero: the adapter changes the model
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(folder)

    run = tmp_path / "dpo"
    sft = run / SFT_ADAPTER_COPY
    save_random_adapter(base(), sft, seed=1)
    save_random_adapter(PeftModel.from_pretrained(base(), sft).merge_and_unload(), run, seed=2)

    model, processor, _ = load_for_inference(ModelArguments(model_name_or_path=str(tiny_qwen), dtype="float32"), run)
    inputs = encode_prompts(processor, chart_rows()[:1])

    def logits(of):
        with torch.no_grad():
            return of(**inputs).logits[0, -1]

    base_plus_sft = PeftModel.from_pretrained(base(), sft).merge_and_unload()
    sft_logits = logits(base_plus_sft)
    expected = logits(PeftModel.from_pretrained(base_plus_sft, run))  # built by hand: base + SFT merged + DPO
    assert torch.allclose(logits(model), expected, atol=1e-5)
    assert not torch.allclose(logits(PeftModel.from_pretrained(base(), run)), expected, atol=1e-3)  # SFT matters
    with model.disable_adapter():  # evaluate's "base": base + SFT
        assert torch.allclose(logits(model), sft_logits, atol=1e-5)

    merged_dir = merge(str(run), str(tmp_path / "merged"), dtype="float32")
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=torch.float32)
    assert torch.allclose(logits(merged), expected, atol=1e-4)  # base + SFT + DPO in one model

    with pytest.raises(RecipeError, match="Merging into a 4-bit model rounds"):
        load_for_inference(ModelArguments(model_name_or_path=str(tiny_qwen), load_in_4bit=True), run)
