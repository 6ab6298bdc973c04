"""Optimizer groups per VLM part and staged unfreezing of the vision tower, as a mixin for TRL's trainers.

The Trainer's own scheduler drives every group; staged unfreezing multiplies the vision tower's schedule by zero until
its step, so the tower's weights do not change, without toggling `requires_grad` (which DDP cannot follow mid-run).
"""

import math
from typing import Any

from trl import DPOTrainer, SFTTrainer

from vlm_recipes.console import print_main
from vlm_recipes.errors import RecipeError
from vlm_recipes.modeling.families import ModelFamily
from vlm_recipes.modeling.strategies import TuningPlan, parameter_groups
from vlm_recipes.training.distributed import DistributedTrainingMixin
from vlm_recipes.training.image_features import image_feature_reuse_blocker, with_image_features
from vlm_recipes.training.speed import SpeedMixin


class PartLearningRatesMixin:
    """Put before a Trainer class: `class MyTrainer(PartLearningRatesMixin, SFTTrainer)`."""

    def __init__(
        self, *args: Any, tuning_plan: TuningPlan | None = None, model_family: ModelFamily | None = None, **kwargs: Any
    ):
        self.tuning_plan = tuning_plan
        self.model_family = model_family
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: Any = None) -> Any:
        if self.optimizer is not None or self.tuning_plan is None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        groups = parameter_groups(
            opt_model,
            self.tuning_plan,
            self.model_family,
            self.args.weight_decay,
            set(self.get_decay_parameter_names(opt_model)),
        )
        optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs or self.get_optimizer_cls_and_kwargs(
            self.args, opt_model
        )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        # The recipe's rates, before a resumed checkpoint's scheduler state replaces them (`guards.ResumeCheck`).
        self.scheduled_learning_rates = list(getattr(scheduler, "base_lrs", []) or []) or None
        plan = self.tuning_plan
        if plan is None or not plan.vit_unfreeze_ratio:
            return scheduler
        if not hasattr(scheduler, "lr_lambdas"):
            raise RecipeError(
                f"vit_unfreeze_ratio needs a LambdaLR schedule (linear, cosine, constant, ...); "
                f"lr_scheduler_type '{self.args.lr_scheduler_type}' is not one."
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


class VLMSFTTrainer(DistributedTrainingMixin, SpeedMixin, PartLearningRatesMixin, SFTTrainer):
    """TRL's `SFTTrainer` with optimizer groups per VLM part, staged unfreezing of the vision tower and the speed
    features (`training.speed`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Qwen-VL models declare `accepts_loss_kwargs = False`, so the Trainer would not count the answer tokens of the
        # whole batch (`num_items_in_batch`) and TRL's loss would be a mean of per-process and per-accumulation-step
        # token means: not what one process computes on the same global batch. TRL computes the loss itself from the
        # log-probabilities and divides by `num_items_in_batch` when it gets it, so the count is right for any model:
        # one process, gradient accumulation and N processes then give the same loss and gradients.
        self.model_accepts_loss_kwargs = True


class VLMDPOTrainer(DistributedTrainingMixin, SpeedMixin, PartLearningRatesMixin, DPOTrainer):
    """TRL's `DPOTrainer` with optimizer groups per VLM part, staged unfreezing of the vision tower, the speed features
    (`training.speed`) and each batch's images encoded once for all four passes (`training.image_features`)."""

    _image_reuse_blocker: str | None

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if self.speed.reuse_image_features:
            # Decided on the model compute_loss gets: wrapped by now, so FSDP and DDP are visible.
            if not hasattr(self, "_image_reuse_blocker"):
                self._image_reuse_blocker = image_feature_reuse_blocker(model, self.model_family)
                print_main(
                    "DPO image features: encoded once per batch for chosen, rejected, policy and reference"
                    if self._image_reuse_blocker is None
                    else f"DPO image features: encoded for every pass, as TRL does ({self._image_reuse_blocker})"
                )
            if self._image_reuse_blocker is None:
                inputs = with_image_features(model, self.model_family, inputs)
        return super().compute_loss(model, inputs, *args, **kwargs)
