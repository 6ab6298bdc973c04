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

from dataclasses import dataclass

from trl import DPOConfig

from vlm_recipes.configs import PolicyArguments
from vlm_recipes.console import setup_console
from vlm_recipes.data.augmentation import build_augmenter
from vlm_recipes.errors import RecipeError, exit_on_recipe_error
from vlm_recipes.hub.token import prepare_training_push
from vlm_recipes.modeling.strategies import TuningPlan
from vlm_recipes.recipe import TrainingRecipe, parse_recipe
from vlm_recipes.training.callbacks import TrainingPlotCallback
from vlm_recipes.training.plots import plot_title
from vlm_recipes.training.policy import check_policy, form_reference
from vlm_recipes.training.run import (
    check_run_settings,
    load_training_model,
    prepare_output_and_data,
    resolve_model,
    train_and_save,
)
from vlm_recipes.training.speed import apply_speed_defaults, take_padding_free
from vlm_recipes.training.trainers import VLMDPOTrainer


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


def apply_defaults(recipe: DPORecipe) -> None:
    """Our defaults over TRL's, where the recipe is silent (the preflight applies the same)."""
    recipe.set_defaults(recipe.training, VISION_DPO_DEFAULTS)
    recipe.set_defaults(recipe.data, PREFERENCE_DATA_DEFAULTS)
    apply_speed_defaults(recipe)


def check_recipe(recipe: DPORecipe, plan: TuningPlan) -> None:
    """Settings that cannot work together (with the run's tuning `plan`) fail here, before any data or weights load;
    `reference` gets its default."""
    if recipe.training.precompute_ref_log_probs:
        raise RecipeError(
            "`precompute_ref_log_probs` is not available for vision data (TRL processes images on the fly); the "
            "reference pass runs with each batch. Remove it from the recipe."
        )
    check_policy(recipe, plan, "DPO")


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
        augmenter=build_augmenter(
            recipe.data.augmentation, training_args.seed, processor, recipe.reliability.min_image_side
        ),  # training images only
    )
    form_reference(trainer, recipe)  # the new adapter's "ref" copy dropped; sft_merged: the SFT adapter kept beside
    title = plot_title(recipe.model.model_name_or_path, "preference", recipe.source)
    trainer.add_callback(TrainingPlotCallback(title=title))  # training_plot.png: loss, reward margins and accuracies
    return trainer


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
