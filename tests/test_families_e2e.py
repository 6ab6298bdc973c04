"""SFT end to end through `python -m vlm_recipes.sft` on every family's tiny model (Qwen2.5-VL: test_sft_e2e.py), and
DPO through `python -m vlm_recipes.dpo` on the issues' families (Qwen2.5-VL: test_dpo.py)."""

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import REPO_ROOT, assert_ok, logged_losses, run_in_process, run_module
from safetensors.torch import load_file
from transformers import AutoConfig

from vlm_recipes.modeling.families import FAMILIES


pytestmark = pytest.mark.e2e

E2E_FAMILIES = sorted(set(FAMILIES) - {"qwen2_5_vl"})
STEPS = 2
# DPO: a new adapter on the families the issues name, and MoE (LoRA on the fused experts) from its own SFT adapter.
# qwen2_vl, gemma3, llava and llava_next take the same path (one recipe, no per-family code) and train by hand the same
# way; they are left out to keep the suite short.
DPO_NEW_ADAPTER_FAMILIES = ("smolvlm", "qwen3_vl", "qwen3_5", "gemma4")
DPO_FROM_SFT_FAMILY = "qwen3_vl_moe"
DPO_FAMILIES = (*DPO_NEW_ADAPTER_FAMILIES, DPO_FROM_SFT_FAMILY)


def run_two_at_a_time(module, root, runs):
    """family -> (output_dir, finished process) for `runs` (family -> recipe, model, data, *more arguments): a few
    steps on 4 rows each, two runs at a time.

    Each run mostly imports (about 10 s); two at a time with one torch thread each overlap that on two cores.
    """
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = {
            family: pool.submit(
                run_module,
                module,
                recipe,
                "--model_name_or_path",
                model,
                "--dataset_name",
                data,
                "--output_dir",
                root / family,
                "--overwrite_output_dir",
                "false",
                "--max_train_samples",
                "4",
                "--per_device_train_batch_size",
                "2",
                "--max_steps",
                STEPS,
                "--logging_steps",
                "1",
                *more,
                env={"OMP_NUM_THREADS": "1"},
            )  # fmt: skip
            for family, (recipe, model, data, *more) in runs.items()
        }
        return {family: (root / family, future.result()) for family, future in results.items()}


@pytest.fixture(scope="module")
def sft_runs(tiny_models, chartqa_dir, tmp_path_factory):
    """family -> (output_dir, finished run): each family's demo recipe through `vlm_recipes.sft`'s main, in this
    process one after the other (a subprocess each spends most of its time importing; test_sft_e2e.py runs the command
    as a subprocess). The run's stderr holds the package's log messages."""
    root = tmp_path_factory.mktemp("families_sft")
    runs = {}
    for family in E2E_FAMILIES:
        args = [
            REPO_ROOT / "recipes" / "demo" / f"{family}.yaml",
            "--model_name_or_path", tiny_models(family), "--dataset_name", chartqa_dir,
            "--output_dir", root / family, "--overwrite_output_dir", "false", "--max_train_samples", "4",
            "--per_device_train_batch_size", "2", "--max_steps", STEPS, "--logging_steps", "1",
        ]  # fmt: skip
        runs[family] = (root / family, run_in_process("vlm_recipes.sft", *args))
    return runs


@pytest.mark.parametrize("family", E2E_FAMILIES)
def test_sft_trains_every_family_and_saves_its_adapter(sft_runs, tiny_models, family):
    output_dir, result = sft_runs[family]
    assert_ok(result)
    losses = logged_losses(output_dir)
    assert len(losses) == STEPS and all(math.isfinite(loss) and loss > 0 for loss in losses)
    files = {path.name for path in output_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "training_log.json", "recipe.yaml"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    # LoRA where the family table says, and the processor saved with the model's own chat template
    row = FAMILIES[family]
    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == row.lora_target_regex()
    config = AutoConfig.from_pretrained(tiny_models(family))
    assert (adapter_config.get("target_parameters") or None) == row.lora_target_parameters(config)
    saved_template = (output_dir / "chat_template.jinja").read_text(encoding="utf-8")
    assert saved_template == (tiny_models(family) / "chat_template.jinja").read_text(encoding="utf-8")
    assert "Assistant-only loss with" in result.stderr  # which training template trains is said


def test_the_moe_adapter_reloads_with_lora_on_its_experts(sft_runs, tiny_models):
    """peft's target_parameters adapter (LoRA on the fused expert weights) saves and loads back onto the base model."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    output_dir, result = sft_runs["qwen3_vl_moe"]
    assert_ok(result)
    base = AutoModelForImageTextToText.from_pretrained(tiny_models("qwen3_vl_moe"), dtype=torch.float32)
    input_ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        base_logits = base(input_ids=input_ids).logits
    model = PeftModel.from_pretrained(base, output_dir)
    experts = [
        name for name, module in model.named_modules() if name.endswith("mlp.experts") and hasattr(module, "lora_A")
    ]
    assert len(experts) == base.config.text_config.num_hidden_layers
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=input_ids).logits, base_logits)  # the trained adapter is applied


# ---------------------------------------------------------------------------------------------------------------------
# DPO: one recipe (recipes/demo/dpo_lora.yaml) for every family, the model and data overridden


@pytest.fixture(scope="module")
def preference_dir(tmp_path_factory):
    from vlm_recipes.data.synthetic import save_generated_dataset

    return save_generated_dataset(tmp_path_factory.mktemp("prefs"), "rlaif_v", train_rows=8, test_rows=4, seed=0)


@pytest.fixture(scope="module")
def dpo_runs(tiny_models, preference_dir, sft_runs, tmp_path_factory):
    """family -> (output_dir, finished process): one DPO recipe for every family; the MoE family starts from the
    adapter its SFT run saved."""
    recipe = REPO_ROOT / "recipes" / "demo" / "dpo_lora.yaml"
    runs = {family: (recipe, tiny_models(family), preference_dir) for family in DPO_NEW_ADAPTER_FAMILIES}
    sft_output = sft_runs[DPO_FROM_SFT_FAMILY][0]
    runs[DPO_FROM_SFT_FAMILY] = (
        recipe,
        tiny_models(DPO_FROM_SFT_FAMILY),
        preference_dir,
        "--sft_adapter_path",
        sft_output,
    )
    return run_two_at_a_time("vlm_recipes.dpo", tmp_path_factory.mktemp("families_dpo"), runs)


def dpo_log(output_dir):
    """The training steps DPO logged: loss and reward metrics per step."""
    return [entry for entry in json.loads((output_dir / "training_log.json").read_text()) if "loss" in entry]


@pytest.mark.extended  # DPO of five families (~3.5 min); tests/test_dpo.py covers DPO in make test
@pytest.mark.parametrize("family", DPO_FAMILIES)
def test_dpo_trains_every_family_against_an_untouched_reference(dpo_runs, family):
    output_dir, result = dpo_runs[family]
    assert_ok(result)
    steps = dpo_log(output_dir)
    assert len(steps) == STEPS and all(math.isfinite(step["loss"]) for step in steps)
    assert all(math.isfinite(step["rewards/margins"]) and "rewards/accuracies" in step for step in steps)
    # Before the first update the policy is the reference (the disabled new adapter, or the frozen SFT adapter copy):
    # a margin of exactly 0 shows the reference is the starting policy, not a moved or re-initialised one.
    assert steps[0]["rewards/margins"] == 0.0
    assert steps[-1]["rewards/margins"] != 0.0  # the policy moved away from it
    files = {path.name for path in output_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "recipe.yaml"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    assert ("ref" in files) == (family == DPO_FROM_SFT_FAMILY)  # only an SFT start keeps a frozen reference copy
    assert "entry point: vlm_recipes.dpo" in (output_dir / "recipe.yaml").read_text()


@pytest.mark.extended  # DPO of five families (~3.5 min); tests/test_dpo.py covers DPO in make test
@pytest.mark.parametrize("family", DPO_NEW_ADAPTER_FAMILIES)
def test_dpo_new_adapter_moves_off_its_identity_start(dpo_runs, family):
    """A new LoRA adapter starts with B = 0 (the identity); after DPO some B is non-zero."""
    output_dir, result = dpo_runs[family]
    assert_ok(result)
    weights = load_file(output_dir / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    assert lora_b and any(tensor.abs().sum() > 0 for tensor in lora_b)


@pytest.mark.extended  # DPO of five families (~3.5 min); tests/test_dpo.py covers DPO in make test
def test_dpo_from_the_families_sft_adapter_trains_that_adapter_further(dpo_runs, sft_runs):
    """MoE from its SFT adapter (LoRA on the fused experts too): the policy moves, its reference copy does not."""
    output_dir, result = dpo_runs[DPO_FROM_SFT_FAMILY]
    assert_ok(result)
    sft, tuned, reference = (
        load_file(folder / "adapter_model.safetensors")
        for folder in (sft_runs[DPO_FROM_SFT_FAMILY][0], output_dir, output_dir / "ref")
    )
    assert tuned.keys() == sft.keys() == reference.keys()
    assert any("experts" in name for name in sft)
    assert all(torch.equal(reference[name].float(), sft[name].float()) for name in sft)
    assert any(not torch.equal(tuned[name].float(), sft[name].float()) for name in sft)
    assert "sft_adapter_path" in (output_dir / "recipe.yaml").read_text()
