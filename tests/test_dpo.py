"""DPO: the reference each recipe forms (in process, on the tiny model), and the real entry point end to end
(`python -m vlm_recipes.dpo RECIPE` in a subprocess): the reward margin grows, DPO starts from an SFT adapter, QLoRA
works on CPU, and bad pairs are counted and skipped."""

import json
import math

import pytest
import torch
from conftest import REPO_ROOT, assert_ok, console_log_lines, run_in_process, run_module, shown_keys
from PIL import Image

from vlm_recipes.dpo import DPORecipe, build_trainer, main, train
from vlm_recipes.recipe import parse_recipe


LORA_RECIPE = REPO_ROOT / "recipes" / "demo" / "dpo_lora.yaml"
FROM_SFT_RECIPE = REPO_ROOT / "recipes" / "demo" / "dpo_from_sft.yaml"


@pytest.fixture(scope="module")
def preference_dir(tmp_path_factory):
    from vlm_recipes.data.synthetic import save_generated_dataset

    return save_generated_dataset(tmp_path_factory.mktemp("prefs"), "rlaif_v", train_rows=48, test_rows=8, seed=0)


@pytest.fixture(scope="module")
def sft_adapter(tiny_qwen, tmp_path_factory):
    """Stands in for an SFT run's output: a LoRA adapter with random (non-zero) weights on the tiny model's language
    model, so the SFT policy differs from the base model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from vlm_recipes.modeling.families import get_family

    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(tiny_qwen, dtype=torch.float32)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=get_family(base).lora_target_regex(), init_lora_weights=False
    )
    folder = tmp_path_factory.mktemp("sft") / "adapter"
    get_peft_model(base, config).save_pretrained(folder)
    return folder


def dpo_args(recipe, model, data, output_dir, *extra):
    return [
        str(value)
        for value in (
            recipe, "--model_name_or_path", model, "--dataset_name", data, "--output_dir", output_dir,
            "--overwrite_output_dir", "false", *extra,
        )
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# The reference, in process: what the trainer compares the policy with, before and after the policy moves


REFERENCE_MODES = {
    "new adapter": [],
    "sft_adapter": ["--reference", "sft_adapter"],
    "sft_merged": ["--reference", "sft_merged"],
}


@pytest.fixture(scope="module")
def trainers(tiny_qwen, preference_dir, sft_adapter, tmp_path_factory):
    """One trainer per way of forming the reference (float32, so merged and unmerged adapters compare closely), with
    the reference log-probabilities of the same batch."""
    built = {}
    for mode, extra in REFERENCE_MODES.items():
        if mode != "new adapter":
            extra = [*extra, "--sft_adapter_path", str(sft_adapter)]
        output_dir = tmp_path_factory.mktemp("dpo") / mode
        argv = dpo_args(LORA_RECIPE, tiny_qwen, preference_dir, output_dir, "--dtype", "float32", "--bf16", "false")
        trainer = build_trainer(parse_recipe(DPORecipe, [*argv, "--max_train_samples", "4", *extra]))
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        built[mode] = (trainer, batch, torch.cat(trainer.compute_ref_log_probs(trainer.model, batch)))
    return built


def move_trained_weights(model):
    """What training does to the policy: the trainable weights change."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.5)


@pytest.mark.parametrize("mode", REFERENCE_MODES)
def test_the_reference_stays_put_while_the_policy_trains(trainers, mode):
    trainer, batch, before = trainers[mode]
    assert trainer.ref_model is None  # no second model: the reference is this model, adapter disabled or swapped
    move_trained_weights(trainer.model)
    after = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
    assert torch.allclose(before, after)


def test_sft_references_are_the_sft_policy_not_the_base(trainers):
    base = trainers["new adapter"][2]
    from_adapter, merged = trainers["sft_adapter"][2], trainers["sft_merged"][2]
    assert torch.allclose(from_adapter, merged, atol=1e-3)  # frozen adapter copy == adapter merged into the base
    assert (from_adapter - base).abs().max() > 0.1


def test_no_second_copy_of_the_model_weights(trainers, tiny_qwen):
    from transformers import AutoModelForImageTextToText

    base_count = sum(p.numel() for p in AutoModelForImageTextToText.from_pretrained(tiny_qwen).parameters())
    for mode, (trainer, _, _) in trainers.items():
        named = dict(trainer.model.named_parameters())
        model_weights = sum(p.numel() for name, p in named.items() if "lora_" not in name)
        assert model_weights == base_count, mode
        adapters = set(trainer.model.peft_config)
        assert adapters == ({"default", "ref"} if mode == "sft_adapter" else {"default"}), mode
        trainable = {name for name, p in named.items() if p.requires_grad}
        assert trainable and all(".default." in name for name in trainable), mode  # the "ref" copy stays frozen


def test_sft_merged_saves_the_sft_adapter_it_sits_on(tiny_qwen, preference_dir, sft_adapter, tmp_path):
    argv = dpo_args(LORA_RECIPE, tiny_qwen, preference_dir, tmp_path / "out", "--sft_adapter_path", sft_adapter)
    trainer = train(parse_recipe(DPORecipe, [*argv, "--reference", "sft_merged", "--max_steps", "2"]))
    assert trainer.state.global_step == 2
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").exists() and not (out / "ref").exists()
    assert (out / "sft_adapter" / "adapter_model.safetensors").read_bytes() == (
        sft_adapter / "adapter_model.safetensors"
    ).read_bytes()


# ---------------------------------------------------------------------------------------------------------------------
# Recipes that cannot work fail before any weights load, with one message


def run_main(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--precompute_ref_log_probs", "true"], "`precompute_ref_log_probs` is not available for vision data"),
        (["--reference", "sft_merged"], "set `sft_adapter_path` too"),
        (["--sft_adapter_path", "SFT", "--tuning_strategy", "qlora", "--reference", "sft_merged"],
         "would merge the SFT adapter into 4-bit weights"),
        (["--sft_adapter_path", "SFT", "--tuning_strategy", "full"], "use tuning_strategy lora or qlora, not 'full'"),
        (["--sft_adapter_path", "/nowhere"], "Adapter folder /nowhere does not exist"),
    ],
)  # fmt: skip
def test_recipes_that_cannot_work_are_explained(
    capsys, tiny_qwen, preference_dir, sft_adapter, tmp_path, extra, fragment
):
    extra = [str(sft_adapter) if value == "SFT" else value for value in extra]
    err = run_main(capsys, [*dpo_args(LORA_RECIPE, tiny_qwen, preference_dir, tmp_path / "o"), *extra])
    assert fragment in err


def test_help_lists_the_dpo_fields(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for field in ("--sft_adapter_path", "--reference", "--beta", "--tuning_strategy", "--formatter"):
        assert field in out


def test_too_many_bad_pairs_stop_before_the_model_loads(capsys, tiny_qwen, tmp_path):
    rows = [{"prompt": "<image>Q", "chosen": "4", "rejected": "4", "images": ["a.png"]}] * 3
    rows.append({"prompt": "<image>Q", "chosen": "4", "rejected": "5", "images": ["a.png"]})
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")  # the valid pair's image exists (the data checks look)
    argv = dpo_args(LORA_RECIPE, tiny_qwen, tmp_path / "p.jsonl", tmp_path / "o", "--formatter", "preference")
    err = run_main(capsys, [*argv, "--dataset_test_split", "none"])
    assert "3 of 4 rows of the 'train' split were rejected" in err and "'chosen' and 'rejected' are identical" in err


def test_existing_output_dir_is_never_overwritten_silently(capsys, tiny_qwen, preference_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "adapter_model.safetensors").write_bytes(b"mine")
    err = run_main(capsys, dpo_args(LORA_RECIPE, tiny_qwen, preference_dir, tmp_path / "taken"))
    assert "already holds files" in err and "overwrite_output_dir" in err
    assert (tmp_path / "taken" / "adapter_model.safetensors").read_bytes() == b"mine"


# ---------------------------------------------------------------------------------------------------------------------
# End to end, through the real entry point


def logged(output_dir, key):
    log = json.loads((output_dir / "training_log.json").read_text())
    return [entry[key] for entry in log if key in entry]


def mean(values):
    return sum(values) / len(values)


@pytest.mark.e2e
def test_lora_dpo_margin_grows_above_zero(tiny_qwen, preference_dir, tmp_path):
    output_dir = tmp_path / "lora"
    result = run_module(
        "vlm_recipes.dpo",
        *dpo_args(LORA_RECIPE, tiny_qwen, preference_dir, output_dir, "--max_steps", "20", "--logging_steps", "1"),
    )
    assert_ok(result)
    margins, accuracies = logged(output_dir, "rewards/margins"), logged(output_dir, "rewards/accuracies")
    assert len(margins) == len(accuracies) == 20 and all(math.isfinite(m) for m in margins)
    assert margins[0] == 0.0  # step 1: the policy is the reference (a new adapter is the identity)
    assert mean(margins[-5:]) > 0.3, margins
    assert mean(accuracies[-5:]) >= 0.7 and mean(accuracies[-5:]) > mean(accuracies[:5]), accuracies
    assert "rewards/margins: 0.0000 at step 1 ->" in result.stdout and "rewards/accuracies:" in result.stdout
    # Each log's console line: DPO's headline keys only (TRL logs 14; logps and logits stay in training_log.json)
    lines = console_log_lines(result.stdout + result.stderr)
    assert len(lines) == 20
    assert all(
        shown_keys(line) == ["loss", "rewards/margins", "rewards/accuracies", "learning_rate"] for line in lines
    )
    assert "logps/chosen" in json.loads((output_dir / "training_log.json").read_text())[0]
    files = {path.name for path in output_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "training_log.json", "recipe.yaml"} <= files
    assert "ref" not in files  # the reference was the base: no adapter copy to save


@pytest.mark.e2e
def test_qlora_dpo_from_an_sft_adapter_skips_bad_pairs(tiny_qwen, sft_adapter, tmp_path, capsys):
    from safetensors.torch import load_file

    from vlm_recipes.data.synthetic import make_preference_rows

    # A user's JSONL with image files, in both shapes the `preference` formatter reads, plus two bad pairs.
    (tmp_path / "img").mkdir()
    rows = []
    for index, raw in enumerate(make_preference_rows(18, seed=5)):
        raw["image"].save(tmp_path / "img" / f"{index}.png")
        if index % 2:
            rows.append({"prompt": f"<image>{raw['question']}", "chosen": raw["chosen"], "rejected": raw["rejected"]})
        else:
            prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": raw["question"]}]}]
            chosen, rejected = ([{"role": "assistant", "content": raw[key]}] for key in ("chosen", "rejected"))
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        rows[-1]["images"] = [f"img/{index}.png"]
    rows[3]["rejected"] = rows[3]["chosen"]
    rows[7]["chosen"] = ""
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(row) for row in rows))

    output_dir = tmp_path / "out"
    argv = dpo_args(
        FROM_SFT_RECIPE, tiny_qwen, tmp_path / "pairs.jsonl", output_dir, "--sft_adapter_path", sft_adapter
    )
    result = run_in_process(
        "vlm_recipes.dpo",
        *argv, "--formatter", "preference", "--dataset_test_split", "none", "--max_bad_fraction", "0.2",
        "--max_steps", "6", "--logging_steps", "1", "--per_device_train_batch_size", "2", capsys=capsys,
    )  # fmt: skip
    assert_ok(result)
    assert "Data check: 2 row(s) rejected" in result.stdout
    report = json.loads((output_dir / "data_report.json").read_text())["train"]
    assert report["kept"] == 16 and {k: v["examples"] for k, v in report["rejected_by_reason"].items()} == {
        "'chosen' and 'rejected' are identical": ["line 4"],
        "'chosen' is empty": ["line 8"],
    }
    margins = logged(output_dir, "rewards/margins")
    assert margins[0] == 0.0 and all(math.isfinite(m) for m in margins)  # step 1: the policy is the SFT reference
    assert any(m != 0.0 for m in margins[1:])
    sft = load_file(sft_adapter / "adapter_model.safetensors")
    tuned, reference = (load_file(path / "adapter_model.safetensors") for path in (output_dir, output_dir / "ref"))
    assert tuned.keys() == sft.keys() == reference.keys()
    assert all(torch.equal(reference[k].float(), sft[k].float().to(reference[k].dtype).float()) for k in sft)
    assert any(not torch.allclose(tuned[k].float(), reference[k].float()) for k in sft)  # DPO moved the SFT adapter
    assert "tuning_strategy: qlora" in (output_dir / "recipe.yaml").read_text()
