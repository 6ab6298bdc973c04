"""Optimizer groups per VLM part, each with its learning rate, and staged unfreezing of the vision tower.

The Trainer's own scheduler drives every group; staged unfreezing multiplies the vision tower's schedule by zero until
its step, so the tower's weights do not change, without toggling `requires_grad` (which DDP cannot follow mid-run).
The trainers in `training.trainers` call both from their `create_optimizer` and `create_scheduler`.
"""

import math
from typing import Any

from vlm_recipes.errors import RecipeError
from vlm_recipes.modeling.families import ModelFamily
from vlm_recipes.modeling.strategies import TuningPlan, parameter_groups


def part_optimizer(trainer: Any, model: Any, plan: TuningPlan, family: ModelFamily) -> Any:
    """The Trainer's optimizer class and settings over one parameter group per (part, decay class), each with its
    part's learning rate (`modeling.strategies.parameter_groups`)."""
    groups = parameter_groups(
        model, plan, family, trainer.args.weight_decay, set(trainer.get_decay_parameter_names(model))
    )
    optimizer_cls, optimizer_kwargs = trainer.optimizer_cls_and_kwargs or trainer.get_optimizer_cls_and_kwargs(
        trainer.args, model
    )
    return optimizer_cls(groups, **optimizer_kwargs)


def stage_vision_unfreezing(scheduler: Any, plan: TuningPlan, num_training_steps: int, scheduler_type: Any) -> Any:
    """The scheduler with the vision tower's groups held at learning rate zero for the plan's `vit_unfreeze_ratio` of
    the steps (unchanged when the plan has none)."""
    if not plan.vit_unfreeze_ratio:
        return scheduler
    if not hasattr(scheduler, "lr_lambdas"):
        raise RecipeError(
            f"vit_unfreeze_ratio needs a LambdaLR schedule (linear, cosine, constant, ...); "
            f"lr_scheduler_type '{scheduler_type}' is not one."
        )
    unfreeze_step = math.ceil(plan.vit_unfreeze_ratio * num_training_steps)
    for index, group in enumerate(scheduler.optimizer.param_groups):
        if group.get("part") == "vision_tower":
            scheduler.lr_lambdas[index] = _after(unfreeze_step, scheduler.lr_lambdas[index])
    # LambdaLR applied the original factors at construction: apply the staged ones from step 0.
    for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    return scheduler


def _after(step: int, factor: Any) -> Any:
    def staged(current_step: int) -> float:
        return 0.0 if current_step < step else factor(current_step)

    return staged
