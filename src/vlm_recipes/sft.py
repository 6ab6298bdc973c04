"""Supervised fine-tuning of a vision-language model from a YAML recipe.

    accelerate launch --config_file accelerate_configs/single_gpu.yaml -m vlm_recipes.sft recipes/chartqa.yaml
    python -m vlm_recipes.sft recipes/chartqa.yaml --learning_rate 1e-4 --max_steps 200

Reads top to bottom: parse the recipe, work out the model side (config, family, tuning strategy: which parts train,
LoRA, 4-bit), check the output folder, load, format and check the data, load the model, train with TRL's `SFTTrainer`
(plus per-part learning rates and the speed features), save the adapter, the processor, the training log and the
recipe as run.
"""

from dataclasses import dataclass

from trl import SFTConfig

from vlm_recipes.configs import EvaluationArguments
from vlm_recipes.console import setup_console
from vlm_recipes.data.augmentation import build_augmenter
from vlm_recipes.errors import exit_on_recipe_error
from vlm_recipes.evaluation.sets import apply_task_defaults, headline_keys, resolve_eval_sets
from vlm_recipes.hub.token import prepare_training_push
from vlm_recipes.modeling.chat_templates import choose_training_template
from vlm_recipes.recipe import TrainingRecipe, parse_recipe
from vlm_recipes.training.callbacks import add_evaluation_callbacks
from vlm_recipes.training.plots import plot_title
from vlm_recipes.training.run import (
    check_run_settings,
    load_training_model,
    prepare_eval_sets,
    prepare_output_and_data,
    resolve_model,
    train_and_save,
)
from vlm_recipes.training.speed import apply_speed_defaults, take_padding_free
from vlm_recipes.training.trainers import VLMSFTTrainer


@dataclass
class SFTRecipe(TrainingRecipe):
    """What an SFT recipe holds: data, model, tuning, run, training (TRL's `SFTConfig`), reliability, speed and the
    answer-level evaluation during training."""

    training: SFTConfig
    evaluation: EvaluationArguments


# Where TRL's defaults do not suit vision data, unless the recipe sets the field itself.
VISION_SFT_DEFAULTS = {
    "assistant_only_loss": True,  # loss on every assistant turn only: never prompts, images or padding
    "max_length": None,  # TRL's 1024 truncates inside the image tokens of larger images
}


def apply_defaults(recipe: SFTRecipe) -> None:
    """Our defaults over TRL's, where the recipe is silent (the preflight applies the same): vision SFT's, the task's
    formatter, length grouping."""
    recipe.set_defaults(recipe.training, VISION_SFT_DEFAULTS)
    apply_task_defaults(recipe)
    apply_speed_defaults(recipe)


def build_trainer(recipe: SFTRecipe) -> VLMSFTTrainer:
    """Everything up to training: model side resolved, output folder checked, data checked, model loaded, trainer
    built."""
    training_args = recipe.training
    apply_defaults(recipe)
    check_run_settings(recipe)  # loggers installed, a training length that trains
    eval_sets = resolve_eval_sets(recipe.data, recipe.evaluation)  # names, tasks, prompt presets checked now
    setup = resolve_model(recipe)  # config, family row and tuning plan, before the output folder, data and weights
    padding_free = take_padding_free(training_args, setup.family, recipe.speed)
    processor = setup.load_processor()
    train_dataset, eval_dataset = prepare_output_and_data(recipe, processor, task="sft")
    generation_sets = prepare_eval_sets(recipe, recipe.evaluation, processor, eval_sets, eval_dataset)

    model = load_training_model(recipe, setup)

    trainer = VLMSFTTrainer(
        model,
        training_args,
        train_dataset,
        eval_dataset,
        processor,
        setup=setup,
        speed=recipe.speed,
        reliability=recipe.reliability,
        # The family's training chat template for assistant-only loss, where TRL has none (None: TRL's own handling)
        training_template=choose_training_template(processor, setup.family, training_args),
        padding_free=padding_free,
        augmenter=build_augmenter(
            recipe.data.augmentation, training_args.seed, processor, recipe.reliability.min_image_side
        ),  # training images only
    )
    title = plot_title(recipe.model.model_name_or_path, recipe.evaluation.task or recipe.data.formatter, recipe.source)
    add_evaluation_callbacks(trainer, recipe.evaluation, generation_sets, title)  # eval/<set>/<metric>, the plot
    return trainer


def train(recipe: SFTRecipe) -> VLMSFTTrainer:
    hub_target = prepare_training_push(recipe.training)  # no token or repo id: stop now, not after training
    trainer = build_trainer(recipe)
    headlines = headline_keys(resolve_eval_sets(recipe.data, recipe.evaluation))  # each set's first metric
    return train_and_save(trainer, recipe, summary_keys=headlines, hub_target=hub_target)


@exit_on_recipe_error
def main(argv: list[str] | None = None) -> None:
    setup_console()
    recipe = parse_recipe(SFTRecipe, argv, prog="python -m vlm_recipes.sft")
    train(recipe)


if __name__ == "__main__":
    main()
