"""The one loading path SFT, DPO, evaluation, chat and merge share: processor, model (16-bit or 4-bit), LoRA."""

import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

from vlm_recipes.configs import ModelArguments, TuningArguments
from vlm_recipes.console import print_main
from vlm_recipes.errors import RecipeError
from vlm_recipes.modeling.families import ModelFamily, get_family
from vlm_recipes.modeling.image_size import bound_image_size
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


def load_processor(
    model_args: ModelArguments, trust_remote_code: bool = False, family: ModelFamily | None = None
) -> Any:
    """The model's processor, with the recipe's image-size bounds in its family's rule (`modeling.image_size`)."""
    processor = AutoProcessor.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, trust_remote_code=trust_remote_code
    )
    family = family or get_family(load_config(model_args, trust_remote_code))
    bound_image_size(processor, family, model_args.image_min_pixels, model_args.image_max_pixels)
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


def check_family_settings(model_args: ModelArguments, family: ModelFamily) -> None:
    """What this family cannot do with the recipe's model settings, said before any weights load."""
    if family.has_fused_experts and model_args.use_peft and not model_args.lora_target_modules:
        # peft's LoRA on a parameter (ParamWrapper) cannot factor dropout out of a fused expert matmul
        if model_args.lora_dropout:
            raise RecipeError(
                f"{family.name} is a mixture of experts: LoRA on its fused expert weights (peft target_parameters) "
                f"needs `lora_dropout: 0` (the recipe has {model_args.lora_dropout}). Or set `lora_target_modules` "
                "to adapt the attention projections only."
            )
        if model_args.use_dora:
            raise RecipeError(f"DoRA does not apply to the fused expert weights of {family.name}; drop `use_dora`.")
    if family.has_fused_experts and model_args.load_in_4bit:
        logger.warning(
            "4-bit loading quantizes nn.Linear layers only: the fused expert weights of %s (most of its parameters) "
            "stay in %s, so the model needs about the memory of a 16-bit one.",
            family.name,
            model_args.dtype,
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
    processor = load_processor(model_args, trust_remote_code, family)
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
) -> TrainingModel:
    """Config -> family -> tuning plan (all checked before any weights load) -> processor -> model -> strategy."""
    config = load_config(model_args, trust_remote_code)
    family = get_family(config)
    plan = resolve_strategy(tuning, model_args, config, family, learning_rate, explicit_fields)
    check_family_settings(model_args, family)
    processor = load_processor(model_args, trust_remote_code, family)
    model = load_model(model_args, config, trust_remote_code)
    model = apply_strategy(model, plan, model_args, family)
    print_main(f"Tuning strategy '{plan.strategy.name}' on {family.name}:", trainable_parameter_table(model, family))
    return TrainingModel(model=model, processor=processor, family=family, plan=plan)
