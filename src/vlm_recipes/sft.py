"""Supervised fine-tuning of a vision-language model from a YAML recipe.

    accelerate launch --config_file accelerate_configs/single_gpu.yaml -m vlm_recipes.sft recipes/chartqa.yaml
    python -m vlm_recipes.sft recipes/chartqa.yaml --learning_rate 1e-4 --max_steps 200

Reads top to bottom: parse the recipe, check the output folder, load and format the data, load the model and processor
and apply the tuning strategy (which parts train, LoRA, 4-bit), train with TRL's `SFTTrainer` (plus per-part learning
rates), save the adapter, the processor, the training log and the recipe as run.
"""

from trl import SFTConfig

from vlm_recipes.configs import (
    DataArguments,
    EvaluationArguments,
    ModelArguments,
    ReliabilityArguments,
    RunArguments,
    SpeedArguments,
    TuningArguments,
)
from vlm_recipes.console import setup_console
from vlm_recipes.errors import exit_on_recipe_error
from vlm_recipes.evaluation.sets import apply_task_defaults, headline_keys, resolve_eval_sets
from vlm_recipes.hub import prepare_training_push
from vlm_recipes.modeling.chat_templates import training_chat_template
from vlm_recipes.recipe import Recipe, parse_recipe
from vlm_recipes.training.callbacks import add_evaluation_callbacks
from vlm_recipes.training.optimization import VLMSFTTrainer
from vlm_recipes.training.run import (
    check_tuning_plan,
    load_training_model,
    prepare_eval_sets,
    prepare_output_and_data,
    train_and_save,
)
from vlm_recipes.training.speed import apply_speed_defaults, take_padding_free


RECIPE_PARTS = {
    "data": DataArguments,
    "model": ModelArguments,
    "tuning": TuningArguments,
    "run": RunArguments,
    "training": SFTConfig,
    "evaluation": EvaluationArguments,
    "reliability": ReliabilityArguments,
    "speed": SpeedArguments,
}

# Where TRL's defaults do not suit vision data, unless the recipe sets the field itself.
VISION_SFT_DEFAULTS = {
    "assistant_only_loss": True,  # loss on every assistant turn only: never prompts, images or padding
    "max_length": None,  # TRL's 1024 truncates inside the image tokens of larger images
}


def build_trainer(recipe: Recipe) -> VLMSFTTrainer:
    """Everything up to training: output folder checked, data formatted, model loaded and wrapped, trainer built."""
    training_args = recipe.training
    recipe.apply_defaults("training", VISION_SFT_DEFAULTS)
    apply_task_defaults(recipe)  # the task's formatter where the recipe names none
    eval_sets = resolve_eval_sets(recipe.data, recipe.evaluation)  # names, tasks, prompt presets checked now
    check_tuning_plan(recipe)  # the strategy against the model's config, before the output folder, data and weights
    apply_speed_defaults(recipe)
    padding_free = take_padding_free(recipe)  # checked against the model family before any data work
    _, train_dataset, eval_dataset = prepare_output_and_data(recipe, task="sft")
    generation_sets = prepare_eval_sets(recipe, eval_sets, eval_dataset)

    loaded = load_training_model(recipe)

    # The family's training chat template for assistant-only loss, where TRL has none (the processor keeps its own).
    with training_chat_template(loaded.processor, loaded.family, training_args) as attach_template:
        trainer = attach_template(
            VLMSFTTrainer(
                model=loaded.model,
                args=training_args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=loaded.processor,
                tuning_plan=loaded.plan,
                model_family=loaded.family,
                speed=recipe.speed,
                padding_free=padding_free,
            )
        )
    add_evaluation_callbacks(trainer, recipe.evaluation, generation_sets)  # eval/<set>/<metric>, training_plot.png
    return trainer


def train(recipe: Recipe) -> VLMSFTTrainer:
    hub_target = prepare_training_push(recipe.training)  # no token or repo id: stop now, not after training
    trainer = build_trainer(recipe)
    headlines = headline_keys(resolve_eval_sets(recipe.data, recipe.evaluation))  # each set's first metric
    return train_and_save(trainer, recipe, summary_keys=headlines, hub_target=hub_target)


@exit_on_recipe_error
def main(argv: list[str] | None = None) -> None:
    setup_console()
    recipe = parse_recipe(RECIPE_PARTS, argv, prog="python -m vlm_recipes.sft")
    train(recipe)


if __name__ == "__main__":
    main()
