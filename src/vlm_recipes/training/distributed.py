"""The launch a run is under (one process, DDP, DeepSpeed ZeRO, FSDP) and what a recipe must do differently there.

    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m vlm_recipes.sft recipes/chartqa.yaml

The Trainer (through accelerate) does the distributing; this module covers what it leaves to the recipe for vision
data: text-only rows cannot hang a sharded launch (`drop_text_only_rows`), DDP looks for unused parameters only when a
step can leave some without a gradient (`find_unused_parameters`, `set_unused_parameter_search`), DPO's frozen
reference adapter is saved whole under ZeRO-3 (`save_frozen_adapters_under_zero3`), and the run says what the launch is
and how large the global batch is (`launch_summary`, `LaunchSummaryCallback`). Work that should happen once happens
once with `vlm_recipes.processes.main_process_first`; the SFT loss being one token mean on any number of processes is
`training.trainers.VLMSFTTrainer`'s.
"""

import atexit
import os
from dataclasses import dataclass
from typing import Any

from accelerate import PartialState
from transformers import TrainerCallback

from vlm_recipes.console import print_main
from vlm_recipes.errors import RecipeError
from vlm_recipes.processes import wait_for_everyone


@dataclass(frozen=True)
class Launch:
    """What the launcher (accelerate launch, torchrun, or none) and the training arguments set up for this run."""

    processes: int
    machines: int
    backend: str | None  # nccl on GPUs, gloo on CPUs, None for one process
    engine: str  # "single", "ddp", "deepspeed" or "fsdp"
    zero_stage: int | None = None
    fsdp_requested: bool = False  # the launch or the recipe asks for FSDP (applied or not)

    @property
    def shards_parameters(self) -> bool:
        """Each process holds only a shard of the weights and gathers a layer's weights when it runs (ZeRO-3, FSDP)."""
        return self.engine == "fsdp" or (self.engine == "deepspeed" and self.zero_stage == 3)

    @property
    def name(self) -> str:
        if self.engine == "deepspeed":
            return f"DeepSpeed ZeRO-{self.zero_stage}"
        return {"single": "one process", "ddp": "DDP", "fsdp": "FSDP"}[self.engine]


def machine_count(processes: int) -> int:
    """Machines in the launch: all processes over the processes per machine (torchrun's LOCAL_WORLD_SIZE)."""
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE") or processes)
    return max(1, processes // max(1, per_machine))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in {"1", "true", "yes"}


def describe_launch(training_args: Any) -> Launch:
    """The launch, from the process group the training arguments set up and what the launcher put in the environment
    (accelerate launch with a DeepSpeed or FSDP config) or the recipe set (`deepspeed: ds.json`, `fsdp: full_shard`)."""
    from accelerate.utils import DistributedType

    state = PartialState()
    processes = state.num_processes
    fsdp_requested = _env_flag("ACCELERATE_USE_FSDP") or bool(getattr(training_args, "fsdp", None))
    plugin = getattr(training_args, "deepspeed_plugin", None)
    if state.distributed_type == DistributedType.FSDP:
        engine = "fsdp"
    elif plugin is not None:
        engine = "deepspeed"
    elif processes > 1:
        engine = "ddp"
    else:
        engine = "single"
    return Launch(
        processes=processes,
        machines=machine_count(processes),
        backend=state.backend if processes > 1 else None,
        engine=engine,
        zero_stage=plugin.zero_stage if plugin is not None else None,
        fsdp_requested=fsdp_requested,
    )


def check_launch(launch: Launch) -> None:
    """Launches that would not do what they say fail here, before any data or weights load."""
    if launch.fsdp_requested and launch.engine != "fsdp" and launch.processes > 1:
        raise RecipeError(
            f"This launch asks for FSDP, but accelerate applies FSDP only on GPUs; on this machine ({launch.backend}, "
            f"{launch.processes} processes) it would silently train with plain DDP, every process holding the "
            "whole model. On CPUs use accelerate_configs/multi_gpu.yaml (DDP) or zero3.yaml (DeepSpeed shards on CPUs "
            "too); keep fsdp.yaml for GPUs."
        )


def global_batch_text(training_args: Any, launch: Launch) -> str:
    per_device = training_args.per_device_train_batch_size
    accumulation = training_args.gradient_accumulation_steps
    total = per_device * accumulation * launch.processes
    return (
        f"global batch {total} = {per_device} per device x {accumulation} accumulation step(s) x "
        f"{launch.processes} process(es)"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Work that should happen once


def _end_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_registered_at_exit = False


def end_process_group_at_exit() -> None:
    """Leave the process group before the interpreter exits: DeepSpeed's CPU communication threads otherwise abort the
    process at exit ("terminate called without an active exception"), after a run that succeeded."""
    global _registered_at_exit
    if not _registered_at_exit:
        atexit.register(_end_process_group)
        _registered_at_exit = True


def _is_adapter_weight(name: str) -> bool:
    return ".lora_" in name or ".modules_to_save." in name


def save_frozen_adapters_under_zero3(trainer: Any, output_dir: str) -> None:
    """Save the adapters again, gathered whole, when ZeRO-3 would leave a frozen one empty. Call on every process.

    Under ZeRO-3 the Trainer saves a peft model from the gathered *trainable* weights only; an adapter kept frozen
    beside the trained one (DPO's reference copy of the SFT adapter, `ref/`) is written with no tensors at all. Here
    every adapter weight, trained or frozen, is gathered (a collective step) and the main process saves all adapters."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    model = trainer.model
    if not (is_deepspeed_zero3_enabled() and hasattr(model, "peft_config")):
        return
    weights = {name: p for name, p in model.named_parameters() if _is_adapter_weight(name)}
    if all(p.requires_grad for p in weights.values()):
        return  # the Trainer's save holds them all
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(weights.values()), modifier_rank=None):
        if trainer.is_world_process_zero():
            state_dict = {name: p.detach().cpu().clone() for name, p in weights.items()}
            model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
    wait_for_everyone()


# ---------------------------------------------------------------------------------------------------------------------
# Text-only rows among image rows


TEXT_ONLY_REASON = "text-only row in a dataset with images (sharded launch)"


def image_counts(dataset: Any) -> list[int] | None:
    """Images per row, read from the Arrow column without decoding any image; None for a dataset without images."""
    import pyarrow.compute as pc

    if dataset is None or "images" not in dataset.column_names:
        return None
    counts: list[int] = []
    for batch in dataset.select_columns(["images"]).with_format("arrow").iter(batch_size=4096):
        counts.extend(pc.fill_null(pc.list_value_length(batch["images"]), 0).to_pylist())
    return counts


def text_only_rows(dataset: Any) -> list[int]:
    """Rows without an image, in a dataset where other rows have images ([] when every row has one, or none does)."""
    counts = image_counts(dataset)
    if not counts or not any(counts):
        return []
    return [index for index, count in enumerate(counts) if count == 0]


def drop_text_only_rows(dataset: Any, split: str, data_report: Any, launch: Launch) -> Any:
    """Under ZeRO-3 or FSDP every process gathers the vision tower's weights when it runs it; a batch with images on one
    process and none on another leaves the first waiting for a gather the second never joins, and the run hangs. So
    there, text-only rows in a dataset with images are skipped and counted in the data report like any rejected row
    (and the run stops before loading the model when they exceed `max_bad_fraction`); every batch stays multimodal."""
    if dataset is None or not launch.shards_parameters:
        return dataset
    rows = text_only_rows(dataset)
    if not rows:
        return dataset
    message = (
        f"has no image, while other rows of the '{split}' split have images. Under {launch.name} a batch with images on "
        "one process and none on another hangs the run, so text-only rows are left out there. To train on them, put "
        "them in a dataset of their own, or train with accelerate_configs/multi_gpu.yaml (DDP), where they are fine"
    )
    for index in rows:
        data_report.reject(split, f"row {index}", TEXT_ONLY_REASON, f"row {index} {message}")
    kept = sorted(set(range(len(dataset))) - set(rows))
    return dataset.select(kept)


# ---------------------------------------------------------------------------------------------------------------------
# DDP: which gradients are reduced, and whether to look for unused parameters


def _trains_outside_language_model(model: Any, family: Any) -> bool:
    return any(
        parameter.requires_grad and family.part_of(name) != "language_model"
        for name, parameter in model.named_parameters()
    )


def find_unused_parameters(model: Any, family: Any) -> bool:
    """DDP's `find_unused_parameters` for this model: whether a step can leave a trained parameter without a gradient.

    Frozen parts never reach DDP (it reduces only parameters that require a gradient). When only language-model
    weights train (LoRA, QLoRA: every decoder layer and projection runs on every batch) none can, so DDP need not
    search the autograd graph for unused parameters after every step, which TRL otherwise turns on for every VLM (a
    slowdown on every step). A trained vision tower or projector can be skipped (a text-only batch; and some families'
    forwards never use parts of the tower, such as LLaVA's last CLIP layer or Gemma 3's pooling head), as can experts
    of a mixture-of-experts model: there DDP must search, or the first such step crashes."""
    if family is None or family.uses_fused_experts(model):
        return True
    return _trains_outside_language_model(model, family)


def set_unused_parameter_search(training_args: Any, model: Any, family: Any) -> None:
    """`ddp_find_unused_parameters` from `find_unused_parameters`, unless the recipe sets it; before TRL's trainer
    chooses its own default (on for every VLM)."""
    if training_args.ddp_find_unused_parameters is not None:
        return
    search = find_unused_parameters(model, family)
    reentrant = (training_args.gradient_checkpointing_kwargs or {}).get("use_reentrant")
    if not (search and reentrant):  # reentrant checkpointing fails with the search: left to TRL, as before
        training_args.ddp_find_unused_parameters = search


def _reduced_parameters(ddp_model: Any) -> list[tuple[str, Any]]:
    """The parameters DDP reduces gradients for: those that require a gradient and are not ignored (as DDP builds its
    reducer)."""
    ignored = getattr(ddp_model, "parameters_to_ignore", set())
    return [
        (name, parameter)
        for name, parameter in ddp_model.module.named_parameters()
        if parameter.requires_grad and name not in ignored
    ]


def ddp_summary(ddp_model: Any, family: Any) -> str:
    """Which parts' gradients DDP reduces, how many tensors and parameters, and whether it looks for unused ones."""
    per_part: dict[str, list[int]] = {}
    for name, parameter in _reduced_parameters(ddp_model):
        counts = per_part.setdefault(family.part_of(name) if family else "model", [0, 0])
        counts[0] += 1
        counts[1] += parameter.numel()
    reduced = ", ".join(
        f"{part.replace('_', ' ')} {tensors} tensors ({numbers:,} parameters)"
        for part, (tensors, numbers) in per_part.items()
    )
    parts = ("vision_tower", "projector", "language_model")
    not_reduced = [part.replace("_", " ") for part in parts if family and part not in per_part]
    frozen = f"; not reduced (frozen): {', '.join(not_reduced)}" if not_reduced else ""
    return (
        f"DDP reduces the gradients of: {reduced or 'nothing'}{frozen}; "
        f"find_unused_parameters: {str(ddp_model.find_unused_parameters).lower()}"
    )


def launch_summary(trainer: Any, family: Any = None) -> list[str]:
    """The launch, the global batch and, under DDP, which gradients are reduced (for the start of training, when the
    model has been wrapped); nothing for one process."""
    from torch.nn.parallel import DistributedDataParallel

    args = trainer.args
    launch = describe_launch(args)
    if launch.processes == 1:
        return []
    lines = [
        f"Launch: {launch.name} over {launch.processes} processes on {launch.machines} machine(s) "
        f"({launch.backend}); {global_batch_text(args, launch)}"
    ]
    if isinstance(trainer.model_wrapped, DistributedDataParallel):
        lines.append(ddp_summary(trainer.model_wrapped, family))
    return lines


class LaunchSummaryCallback(TrainerCallback):
    """When training starts (the model wrapped by then), on the main process: the launch (DDP, ZeRO stage, FSDP), the
    global batch and, under DDP, whose gradients are reduced (`launch_summary`)."""

    def __init__(self, trainer: Any, family: Any = None):
        self.trainer, self.family = trainer, family

    def on_train_begin(self, args, state, control, **kwargs):
        lines = launch_summary(self.trainer, self.family)
        if lines:
            print_main(*lines)
