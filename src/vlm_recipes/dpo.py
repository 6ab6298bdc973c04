"""Direct preference optimization (DPO) of a vision-language model from a YAML recipe.

    accelerate launch --config_file accelerate_configs/single_gpu.yaml -m vlm_recipes.dpo recipes/rlaif_v.yaml
    python -m vlm_recipes.dpo recipes/rlaif_v.yaml --sft_adapter_path outputs/my-sft-run --beta 0.1

Reads top to bottom: parse the recipe, check it (the reference it implies included), check the output folder, load and
format the preference data, load the model and processor and form the policy (the tuning strategy's new adapter, or the
SFT adapter it starts from), train with TRL's `DPOTrainer`, save the adapter, the processor, the training log and the
recipe as run.

With LoRA the reference is never a second copy of the model: for a new adapter it is the model with the adapter
disabled; from an SFT adapter it is a frozen copy of that adapter, or the base with the SFT adapter merged into it
(`reference`, see `vlm_recipes.configs.PolicyArguments`). Strategies without an adapter (`full`, `vit_only`, ...) get
TRL's default, a second, frozen copy of the model.
"""

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trl import DPOConfig

from vlm_recipes.compat import TRL_REFERENCE_ADAPTER
from vlm_recipes.configs import PolicyArguments
from vlm_recipes.console import setup_console
from vlm_recipes.errors import RecipeError, exit_on_recipe_error
from vlm_recipes.hub.token import prepare_training_push
from vlm_recipes.modeling.strategies import TuningPlan
from vlm_recipes.recipe import TrainingRecipe, parse_recipe
from vlm_recipes.run_folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SFT_ADAPTER_COPY, read_adapter_config
from vlm_recipes.training.callbacks import TrainingPlotCallback
from vlm_recipes.training.run import (
    check_run_settings,
    load_training_model,
    prepare_output_and_data,
    resolve_model,
    train_and_save,
)
from vlm_recipes.training.speed import apply_speed_defaults, take_padding_free
from vlm_recipes.training.trainers import VLMDPOTrainer


logger = logging.getLogger(__name__)


@dataclass
class DPORecipe(TrainingRecipe):
    """What a DPO recipe holds: data, model, tuning, run, training (TRL's `DPOConfig`), reliability, speed and where the
    policy starts (the base model, or an SFT run's adapter) with its reference."""

    training: DPOConfig
    policy: PolicyArguments


# Where TRL's defaults do not suit vision data, unless the recipe sets the field itself.
VISION_DPO_DEFAULTS = {
    "max_length": None,  # TRL's 1024 cuts prompt + answer, inside the image tokens of larger images
}
PREFERENCE_DATA_DEFAULTS = {"formatter": "rlaif_v"}

# What DPO learning looks like: the reward margin (chosen minus rejected, in units of beta) and how often chosen wins.
DPO_METRICS = ("rewards/margins", "rewards/accuracies")

# Recipe fields that shape a new adapter; an SFT adapter trained further keeps the shape it was saved with.
NEW_ADAPTER_FIELDS = (
    "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_rslora", "use_dora", "vision_lora_r",
    "train_projector",
)  # fmt: skip


def apply_defaults(recipe: DPORecipe) -> None:
    """Our defaults over TRL's, where the recipe is silent (the preflight applies the same)."""
    recipe.set_defaults(recipe.training, VISION_DPO_DEFAULTS)
    recipe.set_defaults(recipe.data, PREFERENCE_DATA_DEFAULTS)
    apply_speed_defaults(recipe)


def check_recipe(recipe: DPORecipe, plan: TuningPlan) -> None:
    """Settings that cannot work together (with the run's tuning `plan`) fail here, before any data or weights load;
    `reference` gets its default."""
    policy, training_args = recipe.policy, recipe.training
    if training_args.precompute_ref_log_probs:
        raise RecipeError(
            "`precompute_ref_log_probs` is not available for vision data (TRL processes images on the fly); the "
            "reference pass runs with each batch. Remove it from the recipe."
        )
    if policy.reference is not None and policy.sft_adapter_path is None:
        raise RecipeError(
            f"`reference: {policy.reference}` forms the reference from an SFT adapter: set `sft_adapter_path` too "
            "(without one, the reference is the base model)."
        )
    if training_args.sync_ref_model and plan.strategy.uses_lora:
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
            f"DPO from `sft_adapter_path` trains a LoRA adapter: use tuning_strategy lora or qlora, not "
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
    """A new adapter starts as the identity, so the reference is the model with the adapter disabled. TRL takes any
    adapter it is handed as pretrained and adds a frozen copy named "ref" as the reference: for a new adapter that copy
    equals the disabled adapter, at the cost of its memory and a LoRA pass per batch, so it goes."""
    if TRL_REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(TRL_REFERENCE_ADAPTER)


def build_trainer(recipe: DPORecipe) -> VLMDPOTrainer:
    """Everything up to training: model side resolved, recipe and output folder checked, data checked, policy formed,
    trainer built."""
    policy, training_args = recipe.policy, recipe.training
    apply_defaults(recipe)
    check_run_settings(recipe)  # loggers installed, a training length that trains
    setup = resolve_model(recipe)  # config, family row and tuning plan, before the output folder, data and weights
    check_recipe(recipe, setup.plan)
    padding_free = take_padding_free(training_args, setup.family, recipe.speed)  # pairs packed into one sequence
    processor = setup.load_processor()
    train_dataset, eval_dataset = prepare_output_and_data(
        recipe, processor, task="preference", reads={"the SFT adapter's folder": policy.sft_adapter_path}
    )

    model = load_training_model(
        recipe, setup, start_adapter=policy.sft_adapter_path, merge_start_adapter=policy.reference == "sft_merged"
    )
    trainer = VLMDPOTrainer(
        model,
        training_args,
        train_dataset,
        eval_dataset,
        processor,
        setup=setup,
        speed=recipe.speed,
        reliability=recipe.reliability,
        padding_free=padding_free,
    )
    if policy.reference != "sft_adapter":
        use_disabled_adapter_as_reference(trainer.model)
    trainer.add_callback(TrainingPlotCallback())  # training_plot.png: loss and reward metrics by step
    if trainer.is_world_process_zero():
        save_sft_adapter_copy(recipe)
    return trainer


def save_sft_adapter_copy(recipe: DPORecipe) -> None:
    """With `reference: sft_merged` the DPO adapter applies on top of base + SFT adapter: keep both in one folder."""
    if recipe.policy.reference != "sft_merged":
        return
    target = Path(recipe.training.output_dir) / SFT_ADAPTER_COPY
    target.mkdir(exist_ok=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copy2(Path(recipe.policy.sft_adapter_path).expanduser() / name, target / name)


def train(recipe: DPORecipe) -> VLMDPOTrainer:
    hub_target = prepare_training_push(recipe.training)  # no token or repo id: stop now, not after training
    return train_and_save(build_trainer(recipe), recipe, summary_keys=DPO_METRICS, hub_target=hub_target)


@exit_on_recipe_error
def main(argv: list[str] | None = None) -> None:
    setup_console()
    recipe = parse_recipe(DPORecipe, argv, prog="python -m vlm_recipes.dpo")
    train(recipe)


if __name__ == "__main__":
    main()
