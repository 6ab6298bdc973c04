"""Supervised fine-tuning of a vision-language model from a YAML recipe.

    accelerate launch --config_file accelerate_configs/single_gpu.yaml -m vlm_recipes.sft recipes/chartqa.yaml
    python -m vlm_recipes.sft recipes/chartqa.yaml --learning_rate 1e-4 --max_steps 200

Reads top to bottom: parse the recipe, check the output folder, load and format the data, load the model and processor
and apply the tuning strategy (which parts train, LoRA, 4-bit), train with TRL's `SFTTrainer` (plus per-part learning
rates), save the adapter, the processor, the training log and the recipe as run.
"""

from accelerate import PartialState
from trl import SFTConfig

from vlm_recipes.configs import DataArguments, ModelArguments, RunArguments, TuningArguments
from vlm_recipes.console import print_main, setup_console
from vlm_recipes.data.loading import load_datasets
from vlm_recipes.errors import exit_on_recipe_error
from vlm_recipes.modeling.chat_templates import training_chat_template
from vlm_recipes.modeling.loading import load_for_training
from vlm_recipes.recipe import Recipe, parse_recipe
from vlm_recipes.training.optimization import VLMSFTTrainer
from vlm_recipes.training.outputs import prepare_output_dir, resume_requested, save_outputs, summary_lines


RECIPE_PARTS = {
    "data": DataArguments,
    "model": ModelArguments,
    "tuning": TuningArguments,
    "run": RunArguments,
    "training": SFTConfig,
}

# Where TRL's defaults do not suit vision data, unless the recipe sets the field itself.
VISION_SFT_DEFAULTS = {
    "assistant_only_loss": True,  # loss on every assistant turn only: never prompts, images or padding
    "max_length": None,  # TRL's 1024 truncates inside the image tokens of larger images
}


def build_trainer(recipe: Recipe) -> VLMSFTTrainer:
    """Everything up to training: output folder checked, data formatted, model loaded and wrapped, trainer built."""
    data_args, model_args, run_args, training_args = recipe.data, recipe.model, recipe.run, recipe.training
    recipe.apply_defaults("training", VISION_SFT_DEFAULTS)
    output_dir = prepare_output_dir(
        training_args.output_dir,
        overwrite=run_args.overwrite_output_dir,
        resume=resume_requested(training_args.resume_from_checkpoint),
        is_main_process=PartialState().is_main_process,
    )

    # Data first: a missing column, or too many bad rows, fails before any weights load.
    train_dataset, eval_dataset, data_report = load_datasets(
        data_args,
        seed=training_args.seed,
        need_eval=training_args.eval_strategy != "no",
        num_proc=training_args.dataset_num_proc,
    )
    data_report.publish(output_dir, data_args.max_bad_fraction, PartialState().is_main_process)

    loaded = load_for_training(
        model_args, recipe.tuning, training_args.learning_rate, set(recipe.settings), training_args.trust_remote_code
    )

    # The family's training chat template for assistant-only loss, where TRL has none (the processor keeps its own).
    with training_chat_template(loaded.processor, loaded.family, training_args) as attach_template:
        return attach_template(
            VLMSFTTrainer(
                model=loaded.model,
                args=training_args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=loaded.processor,
                tuning_plan=loaded.plan,
                model_family=loaded.family,
            )
        )


def train(recipe: Recipe) -> VLMSFTTrainer:
    trainer = build_trainer(recipe)
    trainer.train(resume_from_checkpoint=resume_requested(recipe.training.resume_from_checkpoint))
    output_dir = recipe.training.output_dir
    save_outputs(trainer, recipe, output_dir)
    print_main(*summary_lines(trainer.state.log_history, output_dir))
    return trainer


@exit_on_recipe_error
def main(argv: list[str] | None = None) -> None:
    setup_console()
    recipe = parse_recipe(RECIPE_PARTS, argv, prog="python -m vlm_recipes.sft")
    train(recipe)


if __name__ == "__main__":
    main()
