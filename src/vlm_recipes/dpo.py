"""Direct preference optimization (DPO) of a vision-language model from a YAML recipe.

    accelerate launch --config_file accelerate_configs/single_gpu.yaml -m vlm_recipes.dpo recipes/rlaif_v.yaml
    python -m vlm_recipes.dpo recipes/rlaif_v.yaml --sft_adapter_path outputs/my-sft-run --beta 0.1

Reads top to bottom: parse the recipe, check it, check the output folder, load and format the preference data, load
the model and processor, form the policy (a new LoRA adapter, or the SFT adapter it starts from) and so its reference,
train with TRL's `DPOTrainer`, save the adapter, the processor, the training log and the recipe as run.

The reference model is never a second copy of the model: with a new adapter it is the model with the adapter disabled
(TRL's default for a PEFT model); from an SFT adapter it is a frozen copy of that adapter, or the base with the SFT
adapter merged into it (`reference`, see `vlm_recipes.configs.PolicyArguments`).
"""

import logging
import shutil
from pathlib import Path
from typing import Any

from trl import DPOConfig, DPOTrainer

from vlm_recipes.configs import DataArguments, ModelArguments, PolicyArguments, RunArguments
from vlm_recipes.console import setup_console
from vlm_recipes.errors import RecipeError, exit_on_recipe_error
from vlm_recipes.modeling.families import ModelFamily
from vlm_recipes.modeling.loading import apply_lora, load_adapter, load_model_and_processor, merge_adapter
from vlm_recipes.recipe import Recipe, parse_recipe
from vlm_recipes.training.run import prepare_output_and_data, train_and_save


logger = logging.getLogger(__name__)

RECIPE_PARTS = {
    "data": DataArguments,
    "model": ModelArguments,
    "policy": PolicyArguments,
    "run": RunArguments,
    "training": DPOConfig,
}

# Where TRL's defaults do not suit vision data, unless the recipe sets the field itself.
VISION_DPO_DEFAULTS = {
    "max_length": None,  # TRL's 1024 cuts prompt + answer, inside the image tokens of larger images
}
PREFERENCE_DATA_DEFAULTS = {"formatter": "rlaif_v"}

# What DPO learning looks like: the reward margin (chosen minus rejected, in units of beta) and how often chosen wins.
DPO_METRICS = ("rewards/margins", "rewards/accuracies")

LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_rslora", "use_dora")
SFT_ADAPTER_COPY = "sft_adapter"  # with `reference: sft_merged`, the SFT adapter the DPO adapter sits on


def check_recipe(recipe: Recipe) -> None:
    """Settings that cannot work together fail here, before any data or weights load; `reference` gets its default."""
    model_args, policy, training_args = recipe.model, recipe.policy, recipe.training
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
    if policy.sft_adapter_path is None:
        return
    policy.reference = policy.reference or "sft_adapter"
    if not model_args.use_peft:
        raise RecipeError(
            "DPO from `sft_adapter_path` trains an adapter: set `use_peft: true`. For full fine-tuning, merge the SFT "
            "adapter into the model first and point `model_name_or_path` at the merged model."
        )
    if policy.reference == "sft_merged" and model_args.load_in_4bit:
        raise RecipeError(
            "`reference: sft_merged` with `load_in_4bit` would merge the SFT adapter into 4-bit weights, which rounds "
            "them: neither the policy nor the reference would be the SFT model. Use `reference: sft_adapter` (exact "
            "with 4 bit: the SFT adapter stays on the 4-bit base it was trained on) or `load_in_4bit: false`."
        )
    if policy.reference == "sft_adapter":
        ignored = [name for name in LORA_FIELDS if name in recipe.settings]
        if ignored:
            logger.warning(
                "%s: ignored with `reference: sft_adapter`, which keeps training the SFT adapter as it was saved.",
                ", ".join(ignored),
            )


def build_policy(model: Any, model_args: ModelArguments, policy: PolicyArguments, family: ModelFamily) -> Any:
    """The PEFT model DPOTrainer trains. What it is decides the reference TRL compares it with."""
    if policy.sft_adapter_path is None:
        # A new adapter; TRL computes the reference with the adapter disabled: the base model.
        return apply_lora(model, model_args, family)
    if policy.reference == "sft_merged":
        # The SFT adapter merged into the base weights in place, a new adapter on top; the reference (adapter
        # disabled) is the merged SFT model.
        return apply_lora(merge_adapter(model, policy.sft_adapter_path), model_args, family)
    # The SFT adapter keeps training as "default"; TRL adds a frozen copy of it named "ref" and computes the reference
    # with that copy active (DPOTrainer: a PEFT model without `peft_config` or `ref_model`).
    return load_adapter(model, policy.sft_adapter_path, trainable=True)


def build_trainer(recipe: Recipe) -> DPOTrainer:
    """Everything up to training: recipe and output folder checked, data formatted, policy formed, trainer built."""
    recipe.apply_defaults("training", VISION_DPO_DEFAULTS)
    recipe.apply_defaults("data", PREFERENCE_DATA_DEFAULTS)
    check_recipe(recipe)
    _, train_dataset, eval_dataset = prepare_output_and_data(recipe, task="preference")

    model, processor, family = load_model_and_processor(recipe.model, recipe.training.trust_remote_code)
    model = build_policy(model, recipe.model, recipe.policy, family)

    return DPOTrainer(
        model=model,
        args=recipe.training,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
    )


def save_sft_adapter_copy(recipe: Recipe) -> None:
    """With `reference: sft_merged` the DPO adapter applies on top of base + SFT adapter: keep both in one folder."""
    if recipe.policy.reference != "sft_merged":
        return
    target = Path(recipe.training.output_dir) / SFT_ADAPTER_COPY
    target.mkdir(exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(Path(recipe.policy.sft_adapter_path).expanduser() / name, target / name)


def train(recipe: Recipe) -> DPOTrainer:
    trainer = train_and_save(build_trainer(recipe), recipe, summary_keys=DPO_METRICS)
    if trainer.is_world_process_zero():
        save_sft_adapter_copy(recipe)
    return trainer


@exit_on_recipe_error
def main(argv: list[str] | None = None) -> None:
    setup_console()
    recipe = parse_recipe(RECIPE_PARTS, argv, prog="python -m vlm_recipes.dpo")
    train(recipe)


if __name__ == "__main__":
    main()
