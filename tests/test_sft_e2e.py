"""SFT end to end through the real entry point (`python -m vlm_recipes.sft RECIPE`), on the tiny model, on CPU."""

import json
import math

import pytest
import torch
from conftest import (
    REPO_ROOT,
    assert_clear_error,
    assert_ok,
    console_log_lines,
    logged_losses,
    run_in_process,
    run_module,
    shown_keys,
)
from PIL import Image

from vlm_recipes.sft import main


pytestmark = pytest.mark.e2e


def sft_args(recipe, model, data, output_dir, *extra):
    return [
        str(REPO_ROOT / "recipes" / "demo" / recipe),
        "--model_name_or_path", model, "--dataset_name", data, "--output_dir", output_dir,
        "--overwrite_output_dir", "false", "--max_train_samples", "16", "--max_steps", "30", "--logging_steps", "1",
        *extra,
    ]  # fmt: skip


def assert_learned(losses):
    assert all(math.isfinite(loss) for loss in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.3, f"loss did not fall: {losses}"


@pytest.fixture(scope="module")
def lora_run(tiny_qwen, chartqa_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("sft") / "lora"
    result = run_module("vlm_recipes.sft", *sft_args("sft_lora.yaml", tiny_qwen, chartqa_dir, output_dir))
    assert_ok(result)
    return output_dir, result


def test_lora_sft_learns_and_saves_an_adapter(lora_run):
    output_dir, result = lora_run
    assert_learned(logged_losses(output_dir))
    files = {path.name for path in output_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "training_log.json", "recipe.yaml"} <= files
    assert {"processor_config.json", "tokenizer.json", "chat_template.jinja"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)  # safetensors only
    assert f"Outputs in {output_dir.resolve()}" in result.stdout
    assert "loss:" in result.stdout and "at step 1 ->" in result.stdout
    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    assert "language_model" in str(adapter_config["target_modules"])  # LoRA on the language model only


# What a run used to print that tells the user nothing: transformers' raw log dicts, datasets' cast and map bars,
# DeepSpeed's CPU notice (not in use), bitsandbytes' CPU kernel hint, TRL's renamed-field warning.
KNOWN_NOISE = ("{'loss'", "{'train_runtime'", "Casting the dataset", "Map:", "Map (num_proc", "Setting accelerator to CPU",
               "gemm_4bit_forward", "`gradient_checkpointing` is deprecated")  # fmt: skip


def test_the_console_shows_one_line_per_log_and_no_known_noise(lora_run):
    output_dir, result = lora_run
    shown = result.stdout + result.stderr
    assert [fragment for fragment in KNOWN_NOISE if fragment in shown] == []
    # The package's own line per log, above the progress bar; the end-of-training dict left to the summary
    lines = console_log_lines(shown)
    assert [line.split("  ")[0] for line in lines] == [f"step {step}/30" for step in range(1, 31)]
    # SFT's headline keys only; training_log.json keeps every logged key (TRL's entropy and token count among them)
    assert all(shown_keys(line) == ["loss", "mean_token_accuracy", "grad_norm", "learning_rate"] for line in lines)
    logged = json.loads((output_dir / "training_log.json").read_text())[0]
    assert {"entropy", "num_tokens", "epoch"} <= set(logged)
    bars = shown.replace("\r", "\n").splitlines()
    assert sum(line.startswith("Loading weights:   0%") for line in bars) == 1  # one model, one loading bar


def assert_adapter_reloads_and_generates(output_dir, base):
    """The adapter saved in `output_dir` loads onto `base` (with the processor saved next to it), changes its logits,
    and generates."""
    from peft import PeftModel
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(output_dir)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "How many bars are shown in the chart?"}],
        }
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[Image.new("RGB", (128, 96), "white")], return_tensors="pt")
    with torch.no_grad():
        base_logits = base(**inputs).logits[0, -1]
    model = PeftModel.from_pretrained(base, output_dir)
    assert not any(p.requires_grad for p in model.parameters())  # loaded for inference
    with torch.no_grad():
        tuned_logits = model(**inputs).logits[0, -1]
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert not torch.allclose(base_logits, tuned_logits)  # the adapter is really applied
    new_tokens = generated[0, inputs["input_ids"].shape[1] :]
    assert 0 < len(new_tokens) <= 6
    assert isinstance(processor.decode(new_tokens, skip_special_tokens=True), str)


def test_adapter_reloads_onto_the_base_model_and_generates(lora_run, tiny_qwen):
    from transformers import AutoModelForImageTextToText

    output_dir, _ = lora_run
    assert_adapter_reloads_and_generates(
        output_dir, AutoModelForImageTextToText.from_pretrained(tiny_qwen, dtype=torch.float32)
    )


def test_qlora_sft_trains_on_cpu_and_its_adapter_reloads_onto_the_4_bit_base(tiny_qwen, chartqa_dir, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText

    from vlm_recipes.configs import ModelArguments
    from vlm_recipes.modeling.base_model import quantization_config
    from vlm_recipes.modeling.families import FAMILIES

    output_dir = tmp_path / "qlora"
    # With evaluation during training, as the flagship recipe runs: each evaluation switches the 4-bit model to eval
    # mode, after which training must go on (tests/test_four_bit_evaluation.py: bitsandbytes' CPU repacking).
    evaluation = ["--eval_strategy", "steps", "--eval_steps", "15", "--max_eval_samples", "4", "--eval_generation_rows", "2",
                  "--max_new_tokens", "2"]  # fmt: skip
    result = run_in_process(
        "vlm_recipes.sft", *sft_args("sft_qlora.yaml", tiny_qwen, chartqa_dir, output_dir, *evaluation), capsys=capsys
    )
    assert_ok(result)
    assert_learned(logged_losses(output_dir))
    log = json.loads((output_dir / "training_log.json").read_text())
    assert [entry["step"] for entry in log if "eval_loss" in entry] == [15, 30]
    assert [entry["step"] for entry in log if "eval_chartqa/relaxed_accuracy" in entry] == [
        15,
        30,
    ]  # eval_<set>/<metric>
    # Each evaluation's own console lines: the loss and token accuracy (no timings), then the answer-level scores
    evaluations = console_log_lines(result.stdout + result.stderr, start="eval step ")
    assert [line.split("  ")[0] for line in evaluations] == ["eval step 15/30"] * 2 + ["eval step 30/30"] * 2
    assert shown_keys(evaluations[0]) == ["loss", "mean_token_accuracy"]
    assert "chartqa/relaxed_accuracy" in shown_keys(evaluations[1])
    assert all(key.startswith("chartqa/") for key in shown_keys(evaluations[1]))
    assert (output_dir / "adapter_model.safetensors").exists()
    recipe = (output_dir / "recipe.yaml").read_text()
    assert "tuning_strategy: qlora" in recipe
    # The base as the adapter was trained on it: 4-bit NF4 language model, 16-bit vision tower and projector
    four_bit = ModelArguments(model_name_or_path=str(tiny_qwen), load_in_4bit=True, dtype="bfloat16")
    base = AutoModelForImageTextToText.from_pretrained(
        tiny_qwen,
        dtype=torch.bfloat16,
        quantization_config=quantization_config(four_bit, FAMILIES["qwen2_5_vl"]),
        device_map="cpu",
    )
    assert base.is_loaded_in_4bit
    assert_adapter_reloads_and_generates(output_dir, base)


def test_existing_output_dir_is_never_overwritten_silently(lora_run, tiny_qwen, chartqa_dir, capsys):
    output_dir, _ = lora_run
    before = {path.name: path.read_bytes() for path in output_dir.iterdir() if path.is_file()}
    result = run_in_process(
        "vlm_recipes.sft", *sft_args("sft_lora.yaml", tiny_qwen, chartqa_dir, output_dir), capsys=capsys
    )
    assert_clear_error(
        result, f"output_dir {output_dir} already holds files", "overwrite_output_dir", "resume_from_checkpoint"
    )
    after = {path.name: path.read_bytes() for path in output_dir.iterdir() if path.is_file()}
    assert after == before


def test_unknown_recipe_field_gets_one_clear_message(tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("model_name_or_path: x\ndataset_name: y\nper_device_train_batchsize: 4\n")
    result = run_in_process("vlm_recipes.sft", recipe, capsys=capsys)
    assert_clear_error(result, "unknown field 'per_device_train_batchsize'", "per_device_train_batch_size")


def run_main(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    assert info.value.code == 2
    return capsys.readouterr().err


def test_unknown_formatter_is_named(capsys, tiny_qwen, chartqa_dir, tmp_path):
    err = run_main(
        capsys, sft_args("sft_lora.yaml", tiny_qwen, chartqa_dir, tmp_path / "o", "--formatter", "chart_qa")
    )
    assert "Unknown formatter 'chart_qa'" in err and "chartqa" in err


def test_missing_columns_are_named(capsys, tiny_qwen, tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"question": "q", "answer": "a", "image": "x.png"}) + "\n")
    err = run_main(capsys, sft_args("sft_lora.yaml", tiny_qwen, tmp_path / "d.jsonl", tmp_path / "o"))
    assert "needs column 'image'" not in err  # the image column is there
    assert "'chartqa' formatter needs column 'query'" in err and "question" in err


def test_placeholder_mismatch_names_the_line(capsys, tiny_qwen, tmp_path):
    rows = [
        {
            "messages": [{"role": "user", "content": "<image> Q"}, {"role": "assistant", "content": "A"}],
            "images": ["a.png"],
        },
        {
            "messages": [{"role": "user", "content": "<image> Q <image>"}, {"role": "assistant", "content": "A"}],
            "images": ["a.png"],
        },
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")  # the valid row's image exists (the data checks look)
    err = run_main(
        capsys,
        sft_args("sft_lora.yaml", tiny_qwen, tmp_path / "d.jsonl", tmp_path / "o", "--formatter", "conversations"),
    )
    assert "1 of 2 rows of the 'train' split were rejected" in err
    assert "d.jsonl, line 2, column 'messages'" in err and "2 <image> placeholder(s)" in err and "1 image(s)" in err
    report = json.loads((tmp_path / "o" / "data_report.json").read_text())
    assert report["train"]["rejected_by_reason"]["<image> placeholders do not match the images"]["examples"] == [
        "line 2"
    ]
