"""The private pieces of TRL, transformers, peft, bitsandbytes and datasets the package relies on (vlm_recipes.compat)
are there, and the installed versions are the ones they were tested with."""

import inspect
import re
from pathlib import Path

import pytest

from vlm_recipes import compat


REPO_ROOT = Path(__file__).resolve().parents[1]


def test_the_installed_libraries_are_the_tested_versions():
    untested = compat.untested_versions()
    assert not untested, (
        f"Untested versions installed: {', '.join(untested)}. vlm_recipes/compat.py reaches into these libraries' "
        "private parts: re-check every piece its table lists against the new version (run the whole suite), then "
        "update compat.TESTED_VERSIONS and the pins in pyproject.toml together."
    )


def test_an_untested_version_is_named(monkeypatch):
    versions = {"trl": "1.16.0", "transformers": "5.99.1", "peft": "0.21.2", "bitsandbytes": None, "datasets": "5.2.0"}
    monkeypatch.setattr(compat, "installed_version", versions.get)
    assert compat.untested_versions() == [
        "transformers 5.99.1 (tested: 5.24.x)",
        "bitsandbytes not installed (tested: 0.50.x)",
    ]


def test_pyproject_pins_the_tested_series():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    for package, series in compat.TESTED_VERSIONS.items():
        major, minor = map(int, series.split("."))
        pin = f'"{package}>={series},<{major}.{minor + 1}"'
        assert pin in pyproject, f"pyproject.toml should pin {pin} (compat.TESTED_VERSIONS)"


def test_the_private_pieces_are_where_compat_expects_them():
    import trl.trainer.utils as trl_utils
    from transformers import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin
    from trl import DPOTrainer, SFTTrainer
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    compat.check_labelled_positions_only()  # TRL's fused LM head and its device switch
    assert callable(trl_utils._use_triton)
    method = getattr(ProcessorMixin, compat.ASSISTANT_MASK_METHOD)
    assert tuple(inspect.signature(method).parameters) == compat.ASSISTANT_MASK_PARAMETERS
    assert callable(Qwen2_5_VLProcessor._get_num_multimodal_tokens)
    assert compat.missing_trainer_hooks() == []
    assert compat.missing_trl_methods() == []
    # TRL's vision preference collator processes each prompt with its images for chosen and for rejected
    source = inspect.getsource(DataCollatorForVisionPreference.torch_call)
    assert re.search(r"\]\s*\*\s*2\s*#\s*repeat for chosen and rejected", source)
    for trainer in (SFTTrainer, DPOTrainer):
        assert "self._total_train_tokens" in inspect.getsource(trainer)
    assert f'"{compat.TRL_REFERENCE_ADAPTER}"' in inspect.getsource(DPOTrainer)
    # TRL's DPO loss: each loss type's per-pair losses averaged and weighed, then the rewards compared
    dpo_loss = inspect.getsource(DPOTrainer._compute_loss)
    assert "loss += per_sequence_loss.mean() * loss_weight" in dpo_loss
    assert "zip(self.loss_types, self.loss_weights, strict=True)" in dpo_loss
    assert "(chosen_rewards > rejected_rewards)" in dpo_loss
    for loss_type in compat.BATCH_MIXING_DPO_LOSSES:
        assert f'loss_type == "{loss_type}"' in dpo_loss
    # bitsandbytes' switch for its CPU inference repacking of 4-bit weights (compat.keep_4bit_weights_trainable)
    from bitsandbytes.nn import Linear4bit

    assert "support_avx512bf16_for_cpu" in inspect.getsource(Linear4bit.__init__)
    assert "packing_format_for_cpu" in inspect.getsource(Linear4bit.forward)


def test_a_4bit_weight_is_recognised(tiny_qwen):
    import torch
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["model.visual", "lm_head"]
    )
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen, quantization_config=quantization, device_map="cpu")
    packed = [name for name, parameter in model.named_parameters() if compat.is_packed_4bit(parameter)]
    assert packed and all("language_model" in name for name in packed)
    assert not compat.is_packed_4bit(torch.nn.Parameter(torch.zeros(2)))


@pytest.mark.parametrize("kwargs, half", [
    ({"text": ["a", "b", "a", "b"], "images": None}, 2),
    ({"text": ["a", "b", "a", "c"], "images": None}, None),  # not a repeat
    ({"text": ["a", "a"]}, None),  # no images= : not the prompt call
])  # fmt: skip
def test_the_doubled_prompt_call_is_recognised(kwargs, half):
    assert compat.doubled_prompt_half((), kwargs) == half


def test_repeated_images_must_be_the_same_objects():
    first, second = [object()], [object()]
    assert compat.doubled_prompt_half((), {"text": ["p", "p"], "images": [first, first]}) == 1
    assert compat.doubled_prompt_half((), {"text": ["p", "p"], "images": [first, second]}) is None


def test_pair_losses_are_the_values_averaged_and_weighed_and_the_comparison_after_them():
    """TRL's shape in small: a mean of each loss type's values times its weight, metrics' means and comparisons
    around it. What is recorded is the values, weighed, and the one comparison of per-pair values after the loss."""
    import torch

    class Trainer:
        loss_weights = [1.0, 0.5]

    trainer = Trainer()
    compat.mark_dpo_loss_weights(trainer)
    assert trainer.loss_weights == [1.0, 0.5]
    chosen, rejected = torch.tensor([0.3, -0.2, 0.1]), torch.tensor([0.1, 0.4, 0.0])
    with compat.recorded_pair_results() as results:
        assert bool((torch.tensor([2.0]) > torch.tensor([1.0])).all())  # before the loss (the model's): not recorded
        loss = 0.0
        for values, weight in zip((chosen - rejected, chosen * 2), trainer.loss_weights, strict=True):
            loss += values.mean() * weight
        chosen.mean().item()  # a metric's mean: not recorded
        accuracies = (chosen > rejected).float()
    assert len(results.losses) == 2
    torch.testing.assert_close(results.losses[0], chosen - rejected)
    torch.testing.assert_close(results.losses[1], chosen)
    torch.testing.assert_close(torch.stack(results.losses).sum(0).mean(), loss)
    assert len(results.reward_accuracies) == 1 and results.reward_accuracies[0].tolist() == accuracies.tolist()
