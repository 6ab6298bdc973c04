"""SFT end to end through `python -m vlm_recipes.sft` on every family's tiny model (Qwen2.5-VL: test_sft_e2e.py)."""

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import REPO_ROOT, assert_ok, logged_losses, run_module

from vlm_recipes.modeling.families import FAMILIES


pytestmark = pytest.mark.e2e

E2E_FAMILIES = sorted(set(FAMILIES) - {"qwen2_5_vl"})
STEPS = 2


@pytest.fixture(scope="module")
def sft_runs(tiny_models, chartqa_dir, tmp_path_factory):
    """family -> (output_dir, finished process): each family's demo recipe, a few steps, two runs at a time.

    Each run mostly imports (about 10 s); two at a time with one torch thread each overlap that on two cores.
    """
    root = tmp_path_factory.mktemp("families_sft")
    runs = {
        family: [
            REPO_ROOT / "recipes" / "demo" / f"{family}.yaml",
            "--model_name_or_path",
            tiny_models(family),
            "--dataset_name",
            chartqa_dir,
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
        ]  # fmt: skip
        for family in E2E_FAMILIES
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = {
            family: pool.submit(run_module, "vlm_recipes.sft", *args, env={"OMP_NUM_THREADS": "1"})
            for family, args in runs.items()
        }
        return {family: (root / family, future.result()) for family, future in results.items()}


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
    assert (adapter_config.get("target_parameters") or None) == row.lora_target_parameters()
    saved_template = (output_dir / "chat_template.jinja").read_text(encoding="utf-8")
    assert saved_template == (tiny_models(family) / "chat_template.jinja").read_text(encoding="utf-8")
    assert "Assistant-only loss with" in result.stderr  # which training template trains is said


def test_the_moe_adapter_reloads_with_lora_on_its_experts(sft_runs, tiny_models):
    """peft's target_parameters adapter (LoRA on the fused expert weights) saves and loads back onto the base model."""
    import torch
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
