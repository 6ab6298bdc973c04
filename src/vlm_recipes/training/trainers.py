"""One trainer per training method: TRL's trainer with what vision-language fine-tuning adds, all set in `__init__`.

    trainer = VLMSFTTrainer(
        model, training_args, train_dataset, eval_dataset, processor,
        setup=setup,                          # the run's ModelSetup: family row and tuning plan (`modeling.setup`)
        speed=recipe.speed,                   # SpeedArguments
        reliability=recipe.reliability,       # ReliabilityArguments: the NaN guard
        training_template=template,           # SFT: ours for assistant-only loss, or None (`modeling.chat_templates`)
        padding_free=padding_free,            # pack rows (`training.speed.take_padding_free`)
    )

What each trainer adds to TRL's, and where the feature lives:
- optimizer groups per part (vision tower, projector, language model) with their learning rates, and staged unfreezing
  of the vision tower (`training.optimization`);
- DDP's unused-parameter search only where a step can skip trained weights, and the launch and global batch printed
  when training starts (`training.distributed`);
- TRL's collator replaced by one with the same output, faster (`training.collators`); length-grouped batches
  (`training.sampling`) or rows packed to a token budget; the LM head at labelled positions only; padding-free packed
  rows, DPO's chosen and rejected in one sequence (`training.speed`, `training.padding_free`), attended one row at a
  time under sdpa (`modeling.segment_attention`);
- SFT: the family's training chat template swapped into the processor while TRL builds its collator, then handed to
  the collator; the processor keeps (and saves) its own (`modeling.chat_templates`);
- memory levers checked where they cannot work (activation offloading, Liger kernels), the vision tower checkpointed
  apart from the language model, images encoded in chunks (`training.memory_levers`);
- fault guards (`training.guards`): checkpoints marked complete only with finite trained weights, a stop at the first
  NaN or infinite loss or gradient before the optimizer step (the loss of every micro-batch is recorded by
  `training_step`), on resume the recipe's learning rates (recorded by `create_scheduler`, applied to the checkpoint
  `train` loads) and no step past `max_steps`, a warning for a run that does not learn;
- DPO: each batch's images encoded once for chosen, rejected, policy and reference (`training.image_features`);
- SFT and DPO: a mixture's loss per source in each training log (`training.source_loss`);
- GRPO: the rewards (`tasks.rewards`) handed to TRL; each prompt's images encoded once per generation batch for all its
  generations, the reference and the policy passes (`training.image_features.ImageFeatureCache`);
- KTO: TRL's own vision collator and sequential sampling (its KL estimate pairs neighbouring rows), the same optimizer
  groups and guards.

The hooks every method shares live in one base, `VLMTrainerHooks` (its `__init__` runs what comes before and after
TRL's; `create_optimizer`, `create_scheduler`, `train`, `compute_loss`, `training_step`), and the samplers of the
methods that batch rows themselves in `LengthGroupedBatches`; both stand before TRL's trainer in the bases, each
override calling TRL's own (`super()`). A new method gets `class VLMXTrainer(VLMTrainerHooks, XTrainer)` and only what
is its own.
"""

from contextlib import nullcontext
from typing import Any

import torch
from trl import DPOTrainer, GRPOTrainer, KTOTrainer, SFTTrainer

from vlm_recipes.compat import (
    BATCH_MIXING_DPO_LOSSES,
    count_tokens_of_global_batch,
    keep_dataset_column,
    mark_dpo_loss_weights,
    recorded_pair_results,
    unsharded_batch_sampler,
    warn_if_untested,
)
from vlm_recipes.configs import ReliabilityArguments, SpeedArguments
from vlm_recipes.console import print_main
from vlm_recipes.data.augmentation import Augmenter, AugmentingCollator
from vlm_recipes.data.loading import DATA_SOURCE
from vlm_recipes.modeling.chat_templates import processor_template_swapped
from vlm_recipes.modeling.segment_attention import attend_per_segment
from vlm_recipes.modeling.setup import ModelSetup
from vlm_recipes.training.collators import faster_collator
from vlm_recipes.training.distributed import LaunchSummaryCallback, set_unused_parameter_search
from vlm_recipes.training.guards import FaultGuards, install_fault_guards
from vlm_recipes.training.image_features import (
    ImageFeatureCache,
    generation_reuse_blocker,
    image_feature_reuse_blocker,
    with_image_features,
)
from vlm_recipes.training.memory_levers import VisionCheckpointing, check_memory_levers, encode_images_in_chunks
from vlm_recipes.training.optimization import part_optimizer, stage_vision_unfreezing
from vlm_recipes.training.padding_free import pack_for_forward, packed_forward
from vlm_recipes.training.source_loss import (
    SOURCE_IDS,
    PairSourceResults,
    SourceIdCollator,
    SourceLosses,
    mixture_sources,
    packed_rows,
    recorded_token_losses,
)
from vlm_recipes.training.speed import (
    LengthGrouping,
    TokenBudget,
    check_speed_settings,
    groups_by_length,
    in_dataset_order,
    lm_head_positions,
)


def _before_trl(args: Any, model: Any, setup: ModelSetup, speed: SpeedArguments) -> None:
    """What must be settled before TRL's `__init__` reads the arguments."""
    warn_if_untested()
    check_speed_settings(speed)
    check_memory_levers(args, model, setup.family, speed)
    set_unused_parameter_search(args, model, setup.family)


def attend_packed_rows_apart(trainer: Any) -> None:
    """Packed rows under sdpa: each row attends to itself alone (`modeling.segment_attention`), not the whole packed
    sequence under a block-diagonal mask; flash-attention keeps its variable-length kernels."""
    switched = [attend_per_segment(model) for model in (trainer.model, getattr(trainer, "ref_model", None))]
    if switched[0]:
        print_main("Attention: packed rows attended one row at a time (sdpa per row; no cross-row work)")


def _after_trl(trainer: Any, speed: SpeedArguments, reliability: ReliabilityArguments) -> FaultGuards:
    """What replaces or joins the pieces TRL's `__init__` built; returns the fault guards the overrides feed."""
    if speed.fast_collator:
        trainer.data_collator = faster_collator(trainer.data_collator)
    if speed.vision_gradient_checkpointing is not None:
        trainer.add_callback(VisionCheckpointing(trainer.family, speed.vision_gradient_checkpointing))
    if speed.vision_chunk_images is not None:
        encode_images_in_chunks(trainer.model, trainer.family, speed.vision_chunk_images)
    if getattr(trainer, "packs_rows", False):
        attend_packed_rows_apart(trainer)
    trainer.add_callback(LaunchSummaryCallback(trainer, trainer.family))
    return install_fault_guards(trainer, reliability)


class VLMTrainerHooks:
    """What every trainer here adds to TRL's, as overrides that each call TRL's own (`super()`). It stands before TRL's
    trainer in the bases (`class VLMSFTTrainer(VLMTrainerHooks, SFTTrainer)`), so TRL's trainer stays the only real
    base and a trainer class keeps only what is its own method's.

    `__init__` takes TRL's five common arguments, the run's `setup`, `speed` and `reliability`, and hands any other
    keyword (GRPO's `reward_funcs`) to TRL's `__init__`.
    """

    def __init__(
        self,
        model: Any,
        args: Any,
        train_dataset: Any,
        eval_dataset: Any,
        processing_class: Any,
        *,
        setup: ModelSetup,
        speed: SpeedArguments,
        reliability: ReliabilityArguments,
        **trl_arguments: Any,
    ):
        self.family, self.plan, self.speed = setup.family, setup.plan, speed
        _before_trl(args, model, setup, speed)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **trl_arguments,
        )
        self.fault_guards = _after_trl(self, speed, reliability)

    def create_optimizer(self, model: Any = None) -> Any:
        if self.optimizer is not None:
            return super().create_optimizer(model)
        self.optimizer = part_optimizer(self, self.model if model is None else model, self.plan, self.family)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        self.fault_guards.scheduler_created(scheduler)  # the recipe's rates, before a checkpoint's state loads
        return stage_vision_unfreezing(scheduler, self.plan, num_training_steps, self.args.lr_scheduler_type)

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        self.fault_guards.training_starts(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        with lm_head_positions(self.speed):
            return super().compute_loss(model, inputs, *args, **kwargs)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        loss = super().training_step(*args, **kwargs)
        self.fault_guards.loss_computed(loss)
        return loss


class LengthGroupedBatches:
    """The samplers and training loader of the trainers that batch rows themselves (SFT, DPO): packed to a token
    budget, grouped by true length, or TRL's; training images augmented at batch time. Stands before TRL's trainer in
    the bases; the trainer sets `length_grouping`, `token_budget` and `augmenter`."""

    length_grouping: LengthGrouping
    token_budget: TokenBudget | None
    augmenter: Augmenter | None

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.token_budget is not None:
            return unsharded_batch_sampler(self.token_budget.sampler(dataset, self.processing_class, self.args))
        if not groups_by_length(self.args):
            return super()._get_train_sampler(train_dataset)
        return self.length_grouping.sampler(dataset, self.processing_class, self.args)

    def _get_eval_sampler(self, eval_dataset: Any) -> Any:
        if not groups_by_length(self.args) or eval_dataset is None:
            return super()._get_eval_sampler(eval_dataset)
        return in_dataset_order(eval_dataset, self.args)

    def get_train_dataloader(self) -> Any:
        """The training loader with the augmenting collator when the recipe augments images (`data.augmentation`);
        evaluation loaders keep the plain collator."""
        if self.augmenter is None:
            return super().get_train_dataloader()
        collator = self.data_collator
        self.data_collator = AugmentingCollator(collator, self.augmenter)
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collator


class VLMSFTTrainer(VLMTrainerHooks, LengthGroupedBatches, SFTTrainer):
    """TRL's `SFTTrainer` for a vision-language model (see the module docstring for what it adds)."""

    def __init__(
        self,
        model: Any,
        args: Any,
        train_dataset: Any,
        eval_dataset: Any,
        processing_class: Any,
        *,
        setup: ModelSetup,
        speed: SpeedArguments,
        reliability: ReliabilityArguments,
        training_template: str | None = None,
        padding_free: bool = False,
        augmenter: Augmenter | None = None,
    ):
        self.augmenter = augmenter  # training images augmented (`data.augmentation`), or None
        self.packs_rows = padding_free  # not `padding_free`: TRL's trainer sets its own
        self.length_grouping = LengthGrouping(speed)
        self.token_budget = TokenBudget(speed) if speed.max_tokens_per_batch is not None else None
        # TRL accepts a processor for assistant-only loss only when its template has generation markers: ours is in
        # the processor while TRL builds its collator, which then renders with it; the processor keeps its own.
        with processor_template_swapped(processing_class, training_template):
            super().__init__(
                model,
                args,
                train_dataset,
                eval_dataset,
                processing_class,
                setup=setup,
                speed=speed,
                reliability=reliability,
            )
        if training_template is not None:
            self.data_collator.chat_template = training_template
        # One token mean over the global batch: one process, gradient accumulation and N processes give the same loss
        count_tokens_of_global_batch(self)
        self.source_losses = self._source_losses()
        if self.source_losses is not None:
            keep_dataset_column(self, DATA_SOURCE)
            self.data_collator = SourceIdCollator(self.data_collator, self.source_losses.names)

    def _source_losses(self) -> SourceLosses | None:
        """`loss/<source>` for a mixture's training rows (`training.source_loss`); None for one source."""
        sources = mixture_sources(self.train_dataset)
        if sources is None:
            return None
        if self.label_smoother is not None or self.compute_loss_func is not None:
            print_main("Loss per source: not logged, the loss is not TRL's token mean (label smoothing, own loss)")
            return None
        return SourceLosses(sources, self.args.loss_type)

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        source_ids = inputs.pop(SOURCE_IDS, None)
        token_rows = None
        if self.packs_rows and "attention_mask" in inputs:
            if source_ids is not None:  # before packing: which row each packed token comes from
                token_rows = packed_rows(inputs["attention_mask"])
            inputs = pack_for_forward(self, model, inputs)
        if source_ids is None or not self.model.training:
            return super().compute_loss(model, inputs, *args, **kwargs)
        with recorded_token_losses(self.accelerator.unwrap_model(model)) as recorded:
            loss = super().compute_loss(model, inputs, *args, **kwargs)
        for log_probs, label_mask in recorded:
            self.source_losses.add(log_probs, label_mask, source_ids, token_rows)
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.source_losses is not None and "loss" in logs:  # a training log, on every process at once
            logs.update(self.source_losses.pop_logs(self.accelerator))
        super().log(logs, *args, **kwargs)


class VLMDPOTrainer(VLMTrainerHooks, LengthGroupedBatches, DPOTrainer):
    """TRL's `DPOTrainer` for a vision-language model (see the module docstring for what it adds). DPO has no
    assistant-only loss, so no training chat template: TRL's collator renders prompts with the model's own."""

    def __init__(
        self,
        model: Any,
        args: Any,
        train_dataset: Any,
        eval_dataset: Any,
        processing_class: Any,
        *,
        setup: ModelSetup,
        speed: SpeedArguments,
        reliability: ReliabilityArguments,
        padding_free: bool = False,
        augmenter: Augmenter | None = None,
    ):
        self.augmenter = augmenter  # a pair's prompt images augmented once (`data.augmentation`), or None
        self.packs_rows = padding_free  # a pair's chosen and rejected, and every pair of the batch, in one sequence
        self.length_grouping = LengthGrouping(speed)
        self.token_budget = (
            TokenBudget(speed, all_conversations=True) if speed.max_tokens_per_batch is not None else None
        )
        self.image_reuse_blocker: str | None = None  # why image features cannot be reused; decided at the first loss
        self._image_reuse_decided = False
        super().__init__(
            model,
            args,
            train_dataset,
            eval_dataset,
            processing_class,
            setup=setup,
            speed=speed,
            reliability=reliability,
        )
        self.source_results = self._source_results()
        if self.source_results is not None:
            keep_dataset_column(self, DATA_SOURCE)
            self.data_collator = SourceIdCollator(self.data_collator, self.source_results.names)
            mark_dpo_loss_weights(self)

    def _source_results(self) -> PairSourceResults | None:
        """`loss/<source>` and `rewards/accuracies/<source>` for a mixture's training pairs (`training.source_loss`);
        None for one source, or a loss that is not a mean of each pair's own loss."""
        sources = mixture_sources(self.train_dataset)
        if sources is None:
            return None
        mixing = sorted(set(self.loss_types) & BATCH_MIXING_DPO_LOSSES)
        if mixing:
            print_main(f"Loss per source: not logged, loss_type {', '.join(mixing)} mixes the pairs of a batch")
            return None
        if self.aux_loss_enabled:
            print_main("Loss per source: the DPO loss alone; the logged loss also holds the router's auxiliary loss")
        return PairSourceResults(sources)

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        source_ids = inputs.pop(SOURCE_IDS, None)
        if source_ids is None or not self.model.training:
            return self._dpo_loss(model, inputs, *args, **kwargs)
        with recorded_pair_results(self.accelerator.unwrap_model(model), self.ref_model) as results:
            loss = self._dpo_loss(model, inputs, *args, **kwargs)
        if len(results.losses) != len(self.loss_types):  # TRL's loss no longer as compat expects: stop logging it
            print_main("Loss per source: TRL's per-pair DPO losses were not found; not logged from here on")
            self.source_results = None
        else:
            accuracies = results.reward_accuracies[0] if len(results.reward_accuracies) == 1 else None
            self.source_results.add(torch.stack(results.losses).sum(0), accuracies, source_ids)
        return loss

    def _dpo_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if self.speed.reuse_image_features:
            if not self._image_reuse_decided:  # on the model compute_loss gets: wrapped by now (FSDP, DDP visible)
                self.image_reuse_blocker = image_feature_reuse_blocker(model, self.family)
                self._image_reuse_decided = True
                print_main(
                    "DPO image features: encoded once per batch for chosen, rejected, policy and reference"
                    if self.image_reuse_blocker is None
                    else f"DPO image features: encoded for every pass, as TRL does ({self.image_reuse_blocker})"
                )
            if self.image_reuse_blocker is None:
                inputs = with_image_features(model, self.family, inputs)
        packing = (
            packed_forward(self.accelerator.unwrap_model(model), self.ref_model) if self.packs_rows else nullcontext()
        )
        with packing:
            return super().compute_loss(model, inputs, *args, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.source_results is not None and "loss" in logs:  # a training log, on every process at once
            logs.update(self.source_results.pop_logs(self.accelerator))
        super().log(logs, *args, **kwargs)


class VLMGRPOTrainer(VLMTrainerHooks, GRPOTrainer):
    """TRL's `GRPOTrainer` for a vision-language model (see the module docstring for what it adds). TRL samples its own
    batches (each prompt repeated once per generation), so no length grouping; it collates nothing (the processor runs
    at generation), so no collator swap."""

    def __init__(
        self,
        model: Any,
        args: Any,
        train_dataset: Any,
        eval_dataset: Any,
        processing_class: Any,
        *,
        reward_funcs: list[Any],
        setup: ModelSetup,
        speed: SpeedArguments,
        reliability: ReliabilityArguments,
    ):
        self.image_features = ImageFeatureCache()
        self.image_reuse_blocker: str | None = None  # why image features cannot be reused; decided at first use
        self._image_reuse_decided = False
        super().__init__(
            model,
            args,
            train_dataset,
            eval_dataset,
            processing_class,
            reward_funcs=reward_funcs,
            setup=setup,
            speed=speed,
            reliability=reliability,
        )

    def _reuses_image_features(self, model: Any) -> bool:
        if not self.speed.reuse_image_features:
            return False
        if not self._image_reuse_decided:  # on the model as the trainer holds it by now (DDP, FSDP visible)
            self.image_reuse_blocker = generation_reuse_blocker(model, self.family)
            self._image_reuse_decided = True
            print_main(
                "GRPO image features: each prompt's images encoded once per generation batch, for every generation, "
                "the reference and the policy"
                if self.image_reuse_blocker is None
                else f"GRPO image features: encoded for every pass, as TRL does ({self.image_reuse_blocker})"
            )
        return self.image_reuse_blocker is None

    def _generate_and_score_completions(self, inputs: Any) -> Any:
        # private: trl 1.16 GRPOTrainer._generate_and_score_completions(inputs), see compat.OVERRIDDEN_TRL_METHODS
        self.image_features.clear()  # a new generation batch
        serving = (
            self.image_features.serving(self.model_wrapped)
            if self._reuses_image_features(self.model_wrapped)
            else nullcontext()
        )
        with serving, lm_head_positions(self.speed):
            return super()._generate_and_score_completions(inputs)

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        serving = self.image_features.serving(model) if self._reuses_image_features(model) else nullcontext()
        with serving:
            return super().compute_loss(model, inputs, *args, **kwargs)


class VLMKTOTrainer(VLMTrainerHooks, KTOTrainer):
    """TRL's `KTOTrainer` for a vision-language model (see the module docstring for what it adds). TRL takes the rows
    in order (its KL estimate pairs each row with its neighbour's completion), so no length grouping."""
