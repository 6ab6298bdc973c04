"""Kahneman-Tversky optimization (KTO) of a vision-language model from a YAML recipe: learning from answers marked
desirable or undesirable, one at a time, without pairs.

    accelerate launch --config_file accelerate_configs/single_gpu.yaml -m vlm_recipes.kto recipes/rlaif_v_kto.yaml
    python -m vlm_recipes.kto recipes/rlaif_v_kto.yaml --sft_adapter_path outputs/my-sft-run --beta 0.1

Reads top to bottom like DPO: parse the recipe, check it (the reference it implies included), check the output folder,
load, format and check the data, split preference pairs into one desirable and one undesirable row
(`data.unpaired`), load the model and form the policy (a new adapter, or the SFT adapter it starts from), train with
TRL's `KTOTrainer`, save the adapter, the processor, the training log and the recipe as run.

The data is a user's unpaired rows (`formatter: unpaired`: `prompt`, `completion`, boolean `label`) or preference pairs
(`rlaif_v`, `preference`), whose chosen answer becomes a desirable row and rejected answer an undesirable one. The
reference is formed as in DPO (`PolicyArguments`).
"""

from dataclasses import dataclass

from trl import KTOConfig

from vlm_recipes.configs import PolicyArguments
from vlm_recipes.console import print_main, setup_console
from vlm_recipes.data.unpaired import label_counts, unpair
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
from vlm_recipes.training.speed import apply_speed_defaults
from vlm_recipes.training.trainers import VLMKTOTrainer


@dataclass
class KTORecipe(TrainingRecipe):
    """What a KTO recipe holds: data, model, tuning, run, training (TRL's `KTOConfig`), reliability, speed and where the
    policy starts (the base model, or an SFT run's adapter) with its reference."""

    training: KTOConfig
    policy: PolicyArguments


# Where TRL's defaults do not suit vision data, unless the recipe sets the field itself.
VISION_KTO_DEFAULTS = {
    "max_length": None,  # TRL's 1024 cuts prompt + answer, inside the image tokens of larger images
    "train_sampling_strategy": "sequential",  # TRL's KL estimate pairs each row with its neighbour's completion
}
UNPAIRED_DATA_DEFAULTS = {"formatter": "rlaif_v"}  # RLAIF-V pairs, split into desirable and undesirable rows
NO_KL_LOSS = "apo_zero_unpaired"  # the one loss type without TRL's KL estimate

# What KTO learning looks like: the implied rewards of desirable and undesirable answers, their gap, and the KL estimate.
KTO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl")
KTO_PANELS = (("implied reward", KTO_METRICS[:3]), ("KL", ("kl",)))


def apply_defaults(recipe: KTORecipe) -> None:
    """Our defaults over TRL's, where the recipe is silent (the preflight applies the same)."""
    recipe.set_defaults(recipe.training, VISION_KTO_DEFAULTS)
    recipe.set_defaults(recipe.data, UNPAIRED_DATA_DEFAULTS)
    apply_speed_defaults(recipe, length_grouping=False)


def check_recipe(recipe: KTORecipe, plan: TuningPlan) -> None:
    """Settings that cannot work together fail here, before any data or weights load; `reference` gets its
    default."""
    training_args = recipe.training
    if training_args.precompute_ref_log_probs:
        raise RecipeError(
            "`precompute_ref_log_probs` is not available for vision data (TRL processes images on the fly); the "
            "reference pass runs with each batch. Remove it from the recipe."
        )
    if training_args.loss_type != NO_KL_LOSS:
        if training_args.train_sampling_strategy != "sequential":
            raise RecipeError(
                f"KTO's `{training_args.loss_type}` loss estimates its KL term from each row and its neighbour's "
                f"completion, so rows are taken in order: set `train_sampling_strategy: sequential` (the rows are "
                f"shuffled once with `seed` before training), not '{training_args.train_sampling_strategy}'."
            )
        if training_args.per_device_train_batch_size < 2:
            raise RecipeError(
                "KTO's KL estimate pairs each row with another row of its batch: set `per_device_train_batch_size` "
                "to 2 or more."
            )
    check_policy(recipe, plan, "KTO")


def build_trainer(recipe: KTORecipe) -> VLMKTOTrainer:
    """Everything up to training: model side resolved, recipe and output folder checked, data checked and unpaired,
    policy formed, trainer built."""
    policy, training_args = recipe.policy, recipe.training
    apply_defaults(recipe)
    check_run_settings(recipe)  # loggers installed, a training length that trains
    setup = resolve_model(recipe)  # config, family row and tuning plan, before the output folder, data and weights
    check_recipe(recipe, setup.plan)
    processor = setup.load_processor()
    train_dataset, eval_dataset = prepare_output_and_data(
        recipe, processor, task="unpaired", reads={"the SFT adapter's folder": policy.sft_adapter_path}
    )
    train_dataset, eval_dataset = unpair(train_dataset, training_args.seed), unpair(eval_dataset, training_args.seed)
    desirable, undesirable = label_counts(train_dataset)
    print_main(
        f"KTO rows: {desirable} desirable, {undesirable} undesirable (weights {training_args.desirable_weight:g} and "
        f"{training_args.undesirable_weight:g})"
    )
    if not desirable or not undesirable:
        raise RecipeError(
            f"KTO needs desirable and undesirable answers; the training rows hold {desirable} desirable and "
            f"{undesirable} undesirable ones."
        )

    model = load_training_model(
        recipe, setup, start_adapter=policy.sft_adapter_path, merge_start_adapter=policy.reference == "sft_merged"
    )
    trainer = VLMKTOTrainer(
        model,
        training_args,
        train_dataset,
        eval_dataset,
        processor,
        setup=setup,
        speed=recipe.speed,
        reliability=recipe.reliability,
    )
    form_reference(trainer, recipe)  # the new adapter's "ref" copy dropped; sft_merged: the SFT adapter kept beside
    title = plot_title(recipe.model.model_name_or_path, "preference", recipe.source)
    trainer.add_callback(TrainingPlotCallback(panels=KTO_PANELS, title=title))  # loss, implied rewards, KL
    return trainer


def train(recipe: KTORecipe) -> VLMKTOTrainer:
    hub_target = prepare_training_push(recipe.training)  # no token or repo id: stop now, not after training
    return train_and_save(build_trainer(recipe), recipe, summary_keys=KTO_METRICS, hub_target=hub_target)


@exit_on_recipe_error
def main(argv: list[str] | None = None) -> None:
    setup_console()
    recipe = parse_recipe(KTORecipe, argv, prog="python -m vlm_recipes.kto")
    train(recipe)


if __name__ == "__main__":
    main()
