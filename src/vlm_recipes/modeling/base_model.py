"""A base model: its config, its processor (with the recipe's image-size bounds) and its weights (16-bit, or 4-bit NF4
with the vision tower kept 16-bit), each loaded the one way every entry point shares (adapters: `modeling.adapters`)."""

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

from vlm_recipes.compat import keep_4bit_weights_trainable
from vlm_recipes.configs import ModelArguments
from vlm_recipes.errors import RecipeError
from vlm_recipes.modeling.families import ModelFamily
from vlm_recipes.modeling.image_size import bound_image_size
from vlm_recipes.run_folder import ADAPTER_CONFIG


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
    name = model_args.model_name_or_path
    if not name:
        raise RecipeError("The recipe sets no `model_name_or_path`.")
    check_model_location(str(name), trust_remote_code)
    try:
        return AutoConfig.from_pretrained(
            name, revision=model_args.model_revision, trust_remote_code=trust_remote_code
        )
    except OSError as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
        reach = (
            "the Hub cannot be reached offline (HF_HUB_OFFLINE is set) and the local Hub cache does not hold it"
            if offline
            else f"as a Hub id it could not be loaded: {' '.join(str(error).split())[:300]}"
        )
        raise RecipeError(
            f"model_name_or_path '{name}': no local folder of that name exists ({Path(name).expanduser().absolute()}), "
            f"and {reach}."
        ) from None
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        raise RecipeError(_remote_code_message(name, "its config names code of its own")) from None


def _looks_local(name: str) -> bool:
    """A path rather than a Hub id (`org/name`): absolute, relative with ./ or ../ or ~, or more than one slash."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _remote_code_message(name: str, what: str) -> str:
    return (
        f"model_name_or_path '{name}': {what}, and transformers has no built-in class for it. Running it needs "
        "`trust_remote_code: true`, which is off by default because it executes Python files from the model folder "
        "(or Hub repository) on this machine: set it only for a model whose code you have read or trust."
    )


def check_model_location(name: str, trust_remote_code: bool = False) -> None:
    """Before transformers looks at `name`: a local path that does not exist, or a local model folder whose config
    needs custom code while `trust_remote_code` is off, is one clear error (transformers would say "Repo id must be in
    the form ...", or ask interactively whether to run the code)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(name).expanduser()
    if not path.exists():
        if _looks_local(name):
            raise RecipeError(f"model_name_or_path: the folder {name} does not exist ({path.absolute()}).")
        return  # a Hub id: transformers resolves it (or says it cannot)
    if not path.is_dir():
        raise RecipeError(f"model_name_or_path: {name} is a file; give the model's folder (with config.json).")
    config_file = path / "config.json"
    if not config_file.is_file():
        adapter = (
            f" It holds a LoRA adapter ({ADAPTER_CONFIG}): pass it as the adapter, with its base model."
            if (path / ADAPTER_CONFIG).is_file()
            else ""
        )
        raise RecipeError(
            f"model_name_or_path: the folder {name} holds no config.json, so it is not a model folder.{adapter}"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise RecipeError(f"{config_file} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise RecipeError(f"{config_file} should hold a JSON object.")
    if config.get("auto_map") and config.get("model_type") not in CONFIG_MAPPING and not trust_remote_code:
        files = sorted({str(ref).split(".")[0] + ".py" for ref in config["auto_map"].values() if isinstance(ref, str)})
        raise RecipeError(
            _remote_code_message(
                name,
                f"the folder holds custom model code ({', '.join(files)}; model type '{config.get('model_type')}')",
            )
        )


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
    model = AutoModelForImageTextToText.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        dtype=_torch_dtype(model_args.dtype),
        attn_implementation=attention_implementation(model_args),
        quantization_config=quantization,
        device_map=_device_map(quantization is not None, for_inference, shard_parameters),
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
    )
    if quantization is not None and not for_inference:
        # An evaluation during training must not leave the 4-bit weights in an inference-only layout (see there);
        # inference-only loading (evaluate, chat) keeps bitsandbytes' faster CPU path.
        keep_4bit_weights_trainable(model)
    return model
