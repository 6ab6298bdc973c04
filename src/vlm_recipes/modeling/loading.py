"""The two ways a model is loaded: for training (`load_for_training`: the run's `ModelSetup` applied to the weights) and
for generation (`load_for_inference`: evaluation, chat and merge, with an adapter checked against its base)."""

from dataclasses import replace
from pathlib import Path
from typing import Any

from vlm_recipes.configs import ModelArguments
from vlm_recipes.console import print_main
from vlm_recipes.errors import RecipeError
from vlm_recipes.modeling.adapters import check_adapter_fits, load_adapter, merge_adapter
from vlm_recipes.modeling.base_model import load_config, load_model, load_processor
from vlm_recipes.modeling.families import ModelFamily, get_family
from vlm_recipes.modeling.frozen_vision import keep_frozen_vision_out_of_backward
from vlm_recipes.modeling.setup import ModelSetup
from vlm_recipes.modeling.strategies import apply_strategy, trainable_parameter_table
from vlm_recipes.run_folder import PROCESSOR_FILES, sft_adapter_under


def load_for_training(
    setup: ModelSetup,
    start_adapter: str | None = None,
    merge_start_adapter: bool = False,
    shard_parameters: bool = False,
) -> Any:
    """The model with the setup's tuning plan applied (LoRA, freezing), printing what trains; its vision tower runs
    without autograd while none of its weights train (`modeling.frozen_vision`).

    `start_adapter` (a saved LoRA adapter, e.g. an SFT run's output) is either merged into the weights before the
    strategy applies (`merge_start_adapter`), or trained further in place of the strategy's new adapter.
    `shard_parameters`: the launch shards the weights (ZeRO-3, FSDP; `training.distributed.Launch`).
    """
    family, plan = setup.family, setup.plan
    model = load_model(setup.model_args, family, setup.trust_remote_code, shard_parameters=shard_parameters)
    if start_adapter and merge_start_adapter:
        model = merge_adapter(model, start_adapter)
    if start_adapter and not merge_start_adapter:
        model = load_adapter(model, start_adapter, trainable=True)
    else:
        model = apply_strategy(model, plan, setup.model_args, family)
    # No backward pass through a vision tower none of whose weights train (checked at each forward: staged unfreezing)
    keep_frozen_vision_out_of_backward(model, family)
    print_main(f"Tuning strategy '{plan.strategy.name}' on {family.name}:", trainable_parameter_table(model, family))
    return model


def load_for_inference(
    model_args: ModelArguments, adapter: str | Path | None = None, trust_remote_code: bool = False
) -> tuple[Any, Any, ModelFamily]:
    """(model, processor, family) in eval mode for generation, on the GPU when there is one. With `adapter`: checked
    against the base first, loaded on it, and the processor saved with the adapter (the one training used).

    An adapter folder holding `sft_adapter/` (DPO with `reference: sft_merged`) applies on top of base + that SFT
    adapter: the SFT adapter is merged into the (16/32-bit) base first, then the adapter is loaded on the result. With
    the adapter switched off (`disable_adapter`), the model is base + SFT."""
    sft_adapter = sft_adapter_under(adapter)
    if sft_adapter is not None and model_args.load_in_4bit:
        raise RecipeError(
            f"The adapter in {adapter} applies on top of base + the SFT adapter in {sft_adapter} (a DPO run with "
            "`reference: sft_merged`), which is merged into the base weights first. Merging into a 4-bit model rounds "
            "the merged weights back to 4 bit, so the result would not be the model DPO trained. Load the base in "
            "16 bit: `--tuning_strategy lora` (or `load_in_4bit: false`)."
        )
    config = load_config(model_args, trust_remote_code)
    family = get_family(config)  # an unsupported model gets the table of families, before anything else loads
    for folder in (sft_adapter, adapter):
        if folder is not None:
            check_adapter_fits(folder, config, model_args.model_name_or_path, trust_remote_code)
    processor = load_processor(model_args, family, trust_remote_code)
    model = load_model(model_args, family, trust_remote_code, for_inference=True)
    if adapter is not None:
        if sft_adapter is not None:
            print_main(
                f"{adapter} applies on top of the SFT adapter in {sft_adapter}: merging that into the base first"
            )
            model = merge_adapter(model, sft_adapter, model_args.model_name_or_path)
        model = load_adapter(model, adapter, model_args.model_name_or_path)
        if any((Path(adapter) / name).is_file() for name in PROCESSOR_FILES):
            processor = load_processor(
                replace(model_args, model_name_or_path=str(adapter), model_revision=None), family, trust_remote_code
            )
    model.eval()
    return model, processor, family
