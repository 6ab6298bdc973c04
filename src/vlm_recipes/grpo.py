"""Group relative policy optimization (GRPO) of a vision-language model from a YAML recipe: rewards from the task's
own metrics.

    accelerate launch --config_file accelerate_configs/single_gpu.yaml -m vlm_recipes.grpo recipes/chartqa_grpo.yaml
    python -m vlm_recipes.grpo recipes/chartqa_grpo.yaml --sft_adapter_path outputs/my-sft-run --num_generations 8

Reads top to bottom: parse the recipe, resolve the task and its rewards (`tasks.rewards`: the task's metrics against
each row's reference answers, and the answer's form), check the recipe (rewards, weights, generation backend, the
reference), check the output folder, load, format and check the prompts (each prompt plus `max_completion_length`
within `max_length`), load the model and form the policy (a new adapter, or the SFT adapter it starts from), train with
TRL's `GRPOTrainer`, save the adapter, the processor, the training log and the recipe as run.

Each step TRL samples `num_generations` completions per prompt (with `temperature`), scores each with every reward,
weighs them (`reward_weights`), and moves the policy towards the completions that beat their group's mean. The
reference (for the KL term, `beta`) is formed as in DPO: the base model (a new adapter disabled), a frozen copy of the
SFT adapter, or base + SFT adapter merged (`PolicyArguments`). Generation runs with transformers' `generate`, or with
vLLM when `use_vllm` is set on a GPU machine where it is installed (`pip install 'vlm-recipes[vllm]'`).
"""

import importlib.util
from dataclasses import dataclass

from trl import GRPOConfig

from vlm_recipes.configs import PolicyArguments, RewardArguments
from vlm_recipes.console import print_main, setup_console
from vlm_recipes.errors import RecipeError, exit_on_recipe_error
from vlm_recipes.evaluation.sets import resolve_task
from vlm_recipes.hub.token import prepare_training_push
from vlm_recipes.modeling.strategies import TuningPlan
from vlm_recipes.recipe import TrainingRecipe, parse_recipe
from vlm_recipes.tasks import Task
from vlm_recipes.tasks.rewards import default_rewards, reward_functions
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
from vlm_recipes.training.trainers import VLMGRPOTrainer


@dataclass
class GRPORecipe(TrainingRecipe):
    """What a GRPO recipe holds: data, model, tuning, run, training (TRL's `GRPOConfig`: generations, temperature,
    beta, reward weights), reliability, speed, where the policy starts, and the rewards."""

    training: GRPOConfig
    policy: PolicyArguments
    rewards: RewardArguments

    def length_limit(self) -> tuple[int | None, int]:
        """Each prompt must leave `max_completion_length` tokens free within `max_length`."""
        return self.rewards.max_length, self.training.max_completion_length or 0


# What GRPO learning looks like: the weighted reward (and each reward's mean), its spread within the groups, how long
# the completions are, and how far the policy moved from the reference.
GRPO_METRICS = ("reward", "reward_std", "completions/mean_length", "kl")


def reward_keys(names: list[str]) -> tuple[str, ...]:
    """The log keys of each reward's mean (TRL's `rewards/<name>/mean`)."""
    return tuple(f"rewards/{name}/mean" for name in names)


def plot_panels(names: list[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return (
        ("reward", ("reward", *reward_keys(names))),
        ("reward spread", ("reward_std",)),
        ("completion length", ("completions/mean_length",)),
        ("KL", ("kl",)),
    )


def apply_defaults(recipe: GRPORecipe) -> Task:
    """Our defaults over TRL's, where the recipe is silent (the preflight applies the same): the task's formatter,
    rewards and answer length. Returns the task."""
    rewards, training_args = recipe.rewards, recipe.training
    task = resolve_task(rewards.task, recipe.data.formatter)
    rewards.task = task.name
    recipe.set_defaults(recipe.data, {"formatter": task.formatter})
    names, weights = default_rewards(task)
    recipe.set_defaults(rewards, {"reward_functions": names})
    if "reward_functions" not in recipe.settings:
        recipe.set_defaults(training_args, {"reward_weights": weights})
    recipe.set_defaults(training_args, {"max_completion_length": task.max_new_tokens})
    apply_speed_defaults(recipe, length_grouping=False)  # TRL repeats each prompt once per generation
    return task


def check_generation_backend(training_args: GRPOConfig) -> None:
    """vLLM only where it can run: installed, and a CUDA GPU. TRL's own fields set it up and pass through unchanged:
    `vllm_mode` (colocate by default: vLLM shares each training GPU; server: `trl vllm-serve` on other GPUs),
    `vllm_gpu_memory_utilization` (the share of each GPU vLLM takes in colocate mode), `vllm_tensor_parallel_size`."""
    if not training_args.use_vllm:
        return
    utilization = training_args.vllm_gpu_memory_utilization
    if training_args.vllm_mode == "colocate" and not 0 < utilization < 1:
        raise RecipeError(
            f"`vllm_gpu_memory_utilization` is {utilization:g}: in colocate mode vLLM shares each GPU with training, "
            "so give it a share between 0 and 1 (TRL's default 0.3)."
        )
    if importlib.util.find_spec("vllm") is None:
        raise RecipeError(
            "`use_vllm: true` needs vLLM, which is not installed: `pip install 'vlm-recipes[vllm]'` on a GPU machine, "
            "or remove `use_vllm` to generate with transformers."
        )
    import torch

    if not torch.cuda.is_available():
        raise RecipeError(
            "`use_vllm: true` needs a CUDA GPU, and none is visible. Remove `use_vllm` to generate with transformers."
        )


def check_recipe(recipe: GRPORecipe, task: Task, plan: TuningPlan) -> None:
    """Settings that cannot work together fail here, before any data or weights load: the rewards and their weights,
    the token budget, the generation backend, the policy's start and reference."""
    rewards, training_args = recipe.rewards, recipe.training
    reward_functions(task, rewards.reward_functions)  # each a reward of the task
    weights = training_args.reward_weights
    if weights is not None and len(weights) != len(rewards.reward_functions):
        raise RecipeError(
            f"`reward_weights` has {len(weights)} weight(s) for {len(rewards.reward_functions)} reward(s) "
            f"({', '.join(rewards.reward_functions)}): give one weight per reward, in the same order."
        )
    completion = training_args.max_completion_length
    if rewards.max_length is not None and completion is not None and completion >= rewards.max_length:
        raise RecipeError(
            f"`max_completion_length` ({completion}) leaves no room for a prompt within `max_length` "
            f"({rewards.max_length}): raise max_length or lower max_completion_length."
        )
    check_generation_backend(training_args)
    check_policy(recipe, plan, "GRPO")


def build_trainer(recipe: GRPORecipe) -> VLMGRPOTrainer:
    """Everything up to training: task and rewards resolved, model side resolved, recipe and output folder checked,
    prompts checked, policy formed, trainer built."""
    policy, training_args = recipe.policy, recipe.training
    task = apply_defaults(recipe)
    check_run_settings(recipe)  # loggers installed, a training length that trains
    setup = resolve_model(recipe)  # config, family row and tuning plan, before the output folder, data and weights
    check_recipe(recipe, task, setup.plan)
    rewards = reward_functions(task, recipe.rewards.reward_functions)
    processor = setup.load_processor()
    train_dataset, eval_dataset = prepare_output_and_data(
        recipe, processor, task="prompt", reads={"the SFT adapter's folder": policy.sft_adapter_path}
    )

    model = load_training_model(
        recipe, setup, start_adapter=policy.sft_adapter_path, merge_start_adapter=policy.reference == "sft_merged"
    )
    trainer = VLMGRPOTrainer(
        model,
        training_args,
        train_dataset,
        eval_dataset,
        processor,
        reward_funcs=rewards,
        setup=setup,
        speed=recipe.speed,
        reliability=recipe.reliability,
    )
    form_reference(trainer, recipe)  # the new adapter's "ref" copy dropped; sft_merged: the SFT adapter kept beside
    weights = training_args.reward_weights or [1.0] * len(rewards)
    print_main(
        f"GRPO rewards ({task.name}): "
        + ", ".join(f"{name} x {weight:g}" for name, weight in zip(recipe.rewards.reward_functions, weights))
        + f"; {training_args.num_generations} generations per prompt, up to {training_args.max_completion_length} "
        f"tokens, temperature {training_args.temperature:g}"
    )
    # training_plot.png: the loss, the rewards, their spread, completion length and KL by step
    title = plot_title(recipe.model.model_name_or_path, task.name, recipe.source)
    trainer.add_callback(TrainingPlotCallback(panels=plot_panels(recipe.rewards.reward_functions), title=title))
    return trainer


def train(recipe: GRPORecipe) -> VLMGRPOTrainer:
    hub_target = prepare_training_push(recipe.training)  # no token or repo id: stop now, not after training
    trainer = build_trainer(recipe)
    keys = ("reward", *reward_keys(recipe.rewards.reward_functions), *GRPO_METRICS[1:])
    return train_and_save(trainer, recipe, summary_keys=keys, hub_target=hub_target)


@exit_on_recipe_error
def main(argv: list[str] | None = None) -> None:
    setup_console()
    recipe = parse_recipe(GRPORecipe, argv, prog="python -m vlm_recipes.grpo")
    train(recipe)


if __name__ == "__main__":
    main()
