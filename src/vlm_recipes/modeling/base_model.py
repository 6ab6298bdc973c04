"""A base model: its config, its processor (with the recipe's image-size bounds) and its weights (16-bit, or 4-bit NF4
with the vision tower kept 16-bit), each loaded the one way every entry point shares (adapters: `modeling.adapters`)."""

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

from vlm_recipes.configs import ModelArguments
from vlm_recipes.errors import RecipeError
from vlm_recipes.modeling.families import ModelFamily
from vlm_recipes.modeling.image_size import bound_image_size


def _torch_dtype(name: str | None) -> Any:
    if name in (None, "auto"):
        return name
    return getattr(torch, name)


def attention_implementation(model_args: ModelArguments) -> str | None:
    """The recipe's `attn_implementation`; unset, flash-attention 2 where it is installed and can run (a CUDA GPU,
    16-bit weights), else transformers' default (sdpa). Flash-attention's variable-length path is also what makes
    padding-free batches pay off."""
    if model_args.attn_implementation is not None:
        return model_args.attn_implementation
    if torch.cuda.is_available() and model_args.dtype in ("bfloat16", "float16") and _installed("flash_attn"):
        return "flash_attention_2"
    return None


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


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


def load_processor(model_args: ModelArguments, family: ModelFamily, trust_remote_code: bool = False) -> Any:
    """The model's processor, with the recipe's image-size bounds in its family's rule (`modeling.image_size`). The
    family comes first (from the config): an unsupported model gets the table of families, not a processor traceback."""
    processor = AutoProcessor.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, trust_remote_code=trust_remote_code
    )
    bound_image_size(processor, family, model_args.image_min_pixels, model_args.image_max_pixels)
    return processor


def quantization_config(
    model_args: ModelArguments, family: ModelFamily, shard_parameters: bool = False
) -> BitsAndBytesConfig | None:
    """QLoRA's 4-bit NF4 for the language model; the vision tower, projector and output head stay in 16 bit.

    `shard_parameters` (ZeRO-3, FSDP): the packed 4-bit weights are stored in the compute dtype, not uint8, because
    these engines flatten and shard every weight together and need them all of one dtype."""
    if model_args.load_in_8bit:
        raise RecipeError("8-bit loading is not supported; use `load_in_4bit: true` (QLoRA) or 16-bit LoRA.")
    if not model_args.load_in_4bit:
        return None
    compute_dtype = _torch_dtype(model_args.dtype)
    if compute_dtype in (None, "auto", torch.float32):
        compute_dtype = torch.bfloat16
    storage = model_args.bnb_4bit_quant_storage
    if shard_parameters:
        wanted = str(compute_dtype).removeprefix("torch.")
        if storage not in (None, wanted):
            raise RecipeError(
                f"`bnb_4bit_quant_storage: {storage}` does not work when ZeRO-3 or FSDP shards the weights: they shard "
                f"all weights together, so the 4-bit weights must be stored in the compute dtype ({wanted}). Remove "
                f"the field (it is set for you) or set it to {wanted}."
            )
        storage = wanted
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=storage,
        llm_int8_skip_modules=family.quantization_skip_modules(),
    )


def _device_map(quantized: bool, for_inference: bool = False, shard_parameters: bool = False) -> Any:
    if shard_parameters:
        return None  # ZeRO-3 and FSDP place (and shard) the weights themselves; a device map conflicts with them
    if not quantized and not (for_inference and torch.cuda.is_available()):
        return None  # the Trainer (or accelerate) places the model; inference without a GPU runs on the CPU
    if torch.cuda.is_available():
        from accelerate import PartialState

        return {"": PartialState().local_process_index}
    return "cpu"


def load_model(
    model_args: ModelArguments,
    family: ModelFamily,
    trust_remote_code: bool = False,
    for_inference: bool = False,
    shard_parameters: bool = False,
) -> Any:
    """The weights: 16-bit, or QLoRA's 4-bit language model (`quantization_config`). `for_inference` places the model on
    this process's GPU when there is one (training leaves that to the Trainer); `shard_parameters` leaves placement to
    ZeRO-3 or FSDP."""
    quantization = quantization_config(model_args, family, shard_parameters)
    return AutoModelForImageTextToText.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        dtype=_torch_dtype(model_args.dtype),
        attn_implementation=attention_implementation(model_args),
        quantization_config=quantization,
        device_map=_device_map(quantization is not None, for_inference, shard_parameters),
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
    )
