"""Where a preference or reward method's policy starts and what its reference is (DPO, GRPO, KTO): the checks a recipe's
`PolicyArguments` get against the run's tuning plan, and the pieces around TRL's own handling of an adapter.

TRL's DPO, GRPO and KTO trainers treat a LoRA model they are handed the same way: its adapter is taken as pretrained
and a frozen copy named "ref" is the reference; with no copy, the reference is the model with its adapter disabled.
A new adapter is the identity at the start, so its copy only costs memory and a LoRA pass per batch: it goes
(`use_disabled_adapter_as_reference`). An SFT adapter trained further keeps its copy (`reference: sft_adapter`), or
is merged into the 16-bit base with a new adapter on top (`reference: sft_merged`).
"""

import logging
import shutil
from pathlib import Path
from typing import Any

from vlm_recipes.compat import TRL_REFERENCE_ADAPTER
from vlm_recipes.errors import RecipeError
from vlm_recipes.modeling.strategies import TuningPlan
from vlm_recipes.recipe import TrainingRecipe
from vlm_recipes.run_folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SFT_ADAPTER_COPY, read_adapter_config


logger = logging.getLogger(__name__)

# Recipe fields that shape a new adapter; an SFT adapter trained further keeps the shape it was saved with.
NEW_ADAPTER_FIELDS = (
    "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_rslora", "use_dora", "vision_lora_r",
    "train_projector",
)  # fmt: skip


def check_policy(recipe: TrainingRecipe, plan: TuningPlan, method: str) -> None:
    """The start and reference `recipe.policy` asks for, against the tuning `plan`, before any data or weights load;
    `reference` gets its default. `method` names the command in messages ("DPO")."""
    policy, training_args = recipe.policy, recipe.training
    if policy.reference is not None and policy.sft_adapter_path is None:
        raise RecipeError(
            f"`reference: {policy.reference}` forms the reference from an SFT adapter: set `sft_adapter_path` too "
            "(without one, the reference is the base model)."
        )
    if getattr(training_args, "sync_ref_model", False) and plan.strategy.uses_lora:
        raise RecipeError(
            "`sync_ref_model` needs a separate reference model; with a LoRA adapter the reference is the model "
            "itself with the adapter disabled (or a frozen adapter copy), so there is none to sync."
        )
    if policy.sft_adapter_path is None:
        return
    read_adapter_config(policy.sft_adapter_path)  # a missing or non-adapter folder fails here, not after loading
    policy.reference = policy.reference or "sft_adapter"
    if not plan.strategy.uses_lora:
        raise RecipeError(
            f"{method} from `sft_adapter_path` trains a LoRA adapter: use tuning_strategy lora or qlora, not "
            f"'{plan.strategy.name}'. For full fine-tuning, merge the SFT adapter into the model first and point "
            "`model_name_or_path` at the merged model."
        )
    if policy.reference == "sft_merged" and plan.strategy.four_bit:
        raise RecipeError(
            "`reference: sft_merged` with 4-bit loading would merge the SFT adapter into 4-bit weights, which rounds "
            "them: neither the policy nor the reference would be the SFT model. Use `reference: sft_adapter` (exact "
            "with 4 bit: the SFT adapter stays on the 4-bit base it was trained on) or tuning_strategy lora (16 bit)."
        )
    ignored = [name for name in NEW_ADAPTER_FIELDS if name in recipe.settings]
    if policy.reference == "sft_adapter" and ignored:
        logger.warning(
            "%s: not used with `reference: sft_adapter`, which trains the SFT adapter further as it was saved.",
            ", ".join(ignored),
        )


def use_disabled_adapter_as_reference(model: Any) -> None:
    """A new adapter starts as the identity, so the reference is the model with the adapter disabled: TRL's frozen
    "ref" copy of it equals that, at the cost of its memory and a LoRA pass per batch, so it goes."""
    if TRL_REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(TRL_REFERENCE_ADAPTER)


def form_reference(trainer: Any, recipe: TrainingRecipe) -> None:
    """After TRL's `__init__`: the reference the recipe asks for (a new adapter's "ref" copy dropped), and, with
    `reference: sft_merged`, the SFT adapter copied beside the outputs (main process)."""
    if recipe.policy.reference != "sft_adapter":
        use_disabled_adapter_as_reference(trainer.model)
    if trainer.is_world_process_zero():
        save_sft_adapter_copy(recipe)


def save_sft_adapter_copy(recipe: TrainingRecipe) -> None:
    """With `reference: sft_merged` the new adapter applies on top of base + SFT adapter: keep both in one folder."""
    if recipe.policy.reference != "sft_merged":
        return
    target = Path(recipe.training.output_dir) / SFT_ADAPTER_COPY
    target.mkdir(exist_ok=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copy2(Path(recipe.policy.sft_adapter_path).expanduser() / name, target / name)
