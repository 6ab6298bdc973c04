"""The one loading path SFT, DPO, evaluation, chat and merge share: processor, model (16-bit or 4-bit), LoRA."""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

from vlm_recipes.configs import ModelArguments, TuningArguments
from vlm_recipes.console import print_main
from vlm_recipes.errors import RecipeError
from vlm_recipes.modeling.families import ModelFamily, get_family
from vlm_recipes.modeling.strategies import TuningPlan, apply_strategy, resolve_strategy, trainable_parameter_table


logger = logging.getLogger(__name__)


def _torch_dtype(name: str | None) -> Any:
    if name in (None, "auto"):
        return name
    return getattr(torch, name)


def load_config(model_args: ModelArguments, trust_remote_code: bool = False) -> Any:
    """The model's config, read before any weights, so a wrong path or family fails fast."""
    if not model_args.model_name_or_path:
        raise RecipeError("The recipe sets no `model_name_or_path`.")
    try:
        return AutoConfig.from_pretrained(
            model_args.model_name_or_path, revision=model_args.model_revision, trust_remote_code=trust_remote_code
        )
    except OSError as error:
        raise RecipeError(
            f"Could not load the model config of '{model_args.model_name_or_path}': {error}. Without network access "
            "only local folders (or models already in the local Hub cache, with HF_HUB_OFFLINE=1) can be loaded."
        ) from None


def set_image_pixel_bounds(processor: Any, min_pixels: int | None, max_pixels: int | None) -> None:
    """Bound the image area the processor keeps (Qwen-VL style `shortest_edge`/`longest_edge` in pixels)."""
    if min_pixels is None and max_pixels is None:
        return
    image_processor = processor.image_processor
    size = dict(image_processor.size or {})
    if "longest_edge" not in size and "max_pixels" not in size:
        raise RecipeError(
            f"`image_min_pixels`/`image_max_pixels` apply to processors that bound the image area (Qwen-VL); "
            f"{type(image_processor).__name__} sizes images by {sorted(size)}."
        )
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    image_processor.size = size


def load_processor(model_args: ModelArguments, trust_remote_code: bool = False) -> Any:
    processor = AutoProcessor.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, trust_remote_code=trust_remote_code
    )
    set_image_pixel_bounds(processor, model_args.image_min_pixels, model_args.image_max_pixels)
    return processor


def quantization_config(model_args: ModelArguments, family: ModelFamily) -> BitsAndBytesConfig | None:
    """QLoRA's 4-bit NF4 for the language model; the vision tower, projector and output head stay in 16 bit."""
    if model_args.load_in_8bit:
        raise RecipeError("8-bit loading is not supported; use `load_in_4bit: true` (QLoRA) or 16-bit LoRA.")
    if not model_args.load_in_4bit:
        return None
    compute_dtype = _torch_dtype(model_args.dtype)
    if compute_dtype in (None, "auto", torch.float32):
        compute_dtype = torch.bfloat16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=model_args.bnb_4bit_quant_storage,
        llm_int8_skip_modules=family.quantization_skip_modules(),
    )


def _device_map(quantized: bool) -> Any:
    if not quantized:
        return None  # the Trainer (or accelerate) places the model
    if torch.cuda.is_available():
        from accelerate import PartialState

        return {"": PartialState().local_process_index}
    return "cpu"


def load_model(model_args: ModelArguments, config: Any, trust_remote_code: bool = False) -> Any:
    family = get_family(config)
    quantization = quantization_config(model_args, family)
    model = AutoModelForImageTextToText.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        dtype=_torch_dtype(model_args.dtype),
        attn_implementation=model_args.attn_implementation,
        quantization_config=quantization,
        device_map=_device_map(quantization is not None),
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
    )
    return model


def load_model_and_processor(
    model_args: ModelArguments, trust_remote_code: bool = False
) -> tuple[Any, Any, ModelFamily]:
    """(model, processor, family). The family is checked from the config before any weights load."""
    config = load_config(model_args, trust_remote_code)
    family = get_family(config)
    processor = load_processor(model_args, trust_remote_code)
    model = load_model(model_args, config, trust_remote_code)
    return model, processor, family


@dataclass
class TrainingModel:
    model: Any
    processor: Any
    family: ModelFamily
    plan: TuningPlan


def load_for_training(
    model_args: ModelArguments,
    tuning: TuningArguments,
    learning_rate: float,
    explicit_fields: set[str] | frozenset[str] = frozenset(),
    trust_remote_code: bool = False,
    start_adapter: str | None = None,
    merge_start_adapter: bool = False,
) -> TrainingModel:
    """Config -> family -> tuning plan (all checked before any weights load) -> processor -> model -> strategy.

    `start_adapter` (a saved LoRA adapter, e.g. an SFT run's output) is either merged into the weights before the
    strategy applies (`merge_start_adapter`), or trained further in place of the strategy's new adapter.
    """
    config = load_config(model_args, trust_remote_code)
    family = get_family(config)
    plan = resolve_strategy(tuning, model_args, config, family, learning_rate, explicit_fields)
    processor = load_processor(model_args, trust_remote_code)
    model = load_model(model_args, config, trust_remote_code)
    if start_adapter and merge_start_adapter:
        model = merge_adapter(model, start_adapter)
    if start_adapter and not merge_start_adapter:
        model = load_adapter(model, start_adapter, trainable=True)
    else:
        model = apply_strategy(model, plan, model_args, family)
    print_main(f"Tuning strategy '{plan.strategy.name}' on {family.name}:", trainable_parameter_table(model, family))
    return TrainingModel(model=model, processor=processor, family=family, plan=plan)


def load_adapter(model: Any, adapter_path: str, *, trainable: bool) -> Any:
    """Put a saved LoRA adapter (the output folder of an SFT run) on `model`, as its adapter named "default"."""
    from peft import PeftModel

    path = Path(adapter_path).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise RecipeError(
            f"{path} holds no adapter_config.json: expected the output folder of a LoRA/QLoRA run "
            "(`vlm_recipes.sft` with a lora or qlora tuning strategy)."
        )
    try:
        return PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as error:
        # A size mismatch or a missing target module: the adapter was trained on another model.
        base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        raise RecipeError(
            f"The adapter in {path} (trained on '{base}') does not fit this model: {str(error).splitlines()[0]}"
        ) from None


def merge_adapter(model: Any, adapter_path: str) -> Any:
    """`model` with a saved LoRA adapter merged into its weights, in place: one model, no adapter left."""
    if getattr(model, "is_loaded_in_4bit", False):
        raise RecipeError(
            "Merging an adapter into a 4-bit model rounds the merged weights back to 4 bit, so the result is not "
            "the adapter's model. Keep the adapter separate instead, or merge into a 16-bit model."
        )
    return load_adapter(model, adapter_path, trainable=False).merge_and_unload()
