"""The one loading path SFT, DPO, evaluation, chat and merge share: processor, model (16-bit or 4-bit), LoRA."""

import json
import logging
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

from vlm_recipes.configs import ModelArguments, TuningArguments
from vlm_recipes.console import print_main
from vlm_recipes.errors import RecipeError
from vlm_recipes.modeling.families import ModelFamily, get_family
from vlm_recipes.modeling.image_size import bound_image_size
from vlm_recipes.modeling.strategies import (
    STRATEGIES,
    TuningPlan,
    apply_strategy,
    resolve_strategy,
    trainable_parameter_table,
)


logger = logging.getLogger(__name__)


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
            " It holds a LoRA adapter (adapter_config.json): pass it as the adapter, with its base model."
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


def load_processor(
    model_args: ModelArguments, trust_remote_code: bool = False, family: ModelFamily | None = None
) -> Any:
    """The model's processor, with the recipe's image-size bounds in its family's rule (`modeling.image_size`)."""
    # The family first: an unsupported model gets the table of families, not a processor traceback.
    family = family or get_family(load_config(model_args, trust_remote_code))
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


def check_family_settings(model_args: ModelArguments, family: ModelFamily, config: Any) -> None:
    """What this family (this checkpoint of it: `config`) cannot do with the recipe's model settings, said before any
    weights load."""
    experts = family.uses_fused_experts(config)
    if experts and model_args.use_peft and not model_args.lora_target_modules:
        # peft's LoRA on a parameter (ParamWrapper) cannot factor dropout out of a fused expert matmul
        if model_args.lora_dropout:
            raise RecipeError(
                f"{family.name} is a mixture of experts: LoRA on its fused expert weights (peft target_parameters) "
                f"needs `lora_dropout: 0` (the recipe has {model_args.lora_dropout}). Or set `lora_target_modules` "
                "to adapt the attention projections only."
            )
        if model_args.use_dora:
            raise RecipeError(f"DoRA does not apply to the fused expert weights of {family.name}; drop `use_dora`.")
    if experts and model_args.load_in_4bit:
        logger.warning(
            "4-bit loading quantizes nn.Linear layers only: the fused expert weights of %s (most of its parameters) "
            "stay in %s, so the model needs about the memory of a 16-bit one.",
            family.name,
            model_args.dtype,
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
    config: Any,
    trust_remote_code: bool = False,
    for_inference: bool = False,
    shard_parameters: bool = False,
) -> Any:
    family = get_family(config)
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
        keep_4bit_weights_trainable(model)
    return model


def keep_4bit_weights_trainable(model: Any) -> int:
    """Turn off bitsandbytes' inference-only repacking of 4-bit weights on CPUs in a model that trains; returns how many
    4-bit layers it applies to.

    bitsandbytes 0.50.2 (`Linear4bit.forward`): on a CPU with AVX512-BF16 (`support_avx512bf16_for_cpu`), the first
    forward of a 4-bit layer in eval mode without gradients repacks its weight in place into a layout only an inference
    kernel reads (`quant_state.packing_format_for_cpu`), and the layer keeps it after `model.train()`. An evaluation
    during training (`eval_strategy`) is exactly that forward; the next training step then goes through the inference
    kernel, which has no backward: "a view of a leaf Variable that requires grad is being used in an in-place
    operation", or silently wrong gradients for the layers below. Training therefore keeps the trainable layout;
    evaluation during training runs bitsandbytes' ordinary 4-bit path, as training does. Inference-only loading
    (`load_for_inference`: evaluate, chat) keeps the faster repacking."""
    from bitsandbytes.nn import Linear4bit

    layers = [module for module in model.modules() if isinstance(module, Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def load_model_and_processor(
    model_args: ModelArguments, trust_remote_code: bool = False, for_inference: bool = False
) -> tuple[Any, Any, ModelFamily]:
    """(model, processor, family). The family is checked from the config before any weights load.

    `for_inference` places the model on this process's GPU when there is one (training leaves that to the Trainer).
    """
    config = load_config(model_args, trust_remote_code)
    family = get_family(config)
    processor = load_processor(model_args, trust_remote_code, family)
    model = load_model(model_args, config, trust_remote_code, for_inference)
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
    shard_parameters: bool = False,
) -> TrainingModel:
    """Config -> family -> tuning plan (all checked before any weights load) -> processor -> model -> strategy.

    `start_adapter` (a saved LoRA adapter, e.g. an SFT run's output) is either merged into the weights before the
    strategy applies (`merge_start_adapter`), or trained further in place of the strategy's new adapter.
    `shard_parameters`: the launch shards the weights (ZeRO-3, FSDP; `training.distributed.Launch`).
    """
    config = load_config(model_args, trust_remote_code)
    family = get_family(config)
    plan = resolve_strategy(tuning, model_args, config, family, learning_rate, explicit_fields)
    check_family_settings(model_args, family, config)
    processor = load_processor(model_args, trust_remote_code, family)
    model = load_model(model_args, config, trust_remote_code, shard_parameters=shard_parameters)
    if start_adapter and merge_start_adapter:
        model = merge_adapter(model, start_adapter)
    if start_adapter and not merge_start_adapter:
        model = load_adapter(model, start_adapter, trainable=True)
    else:
        model = apply_strategy(model, plan, model_args, family)
    print_main(f"Tuning strategy '{plan.strategy.name}' on {family.name}:", trainable_parameter_table(model, family))
    return TrainingModel(model=model, processor=processor, family=family, plan=plan)


# ---------------------------------------------------------------------------------------------------------------------
# A trained adapter on its base model: evaluation, chat and merge


ADAPTER_CONFIG = "adapter_config.json"
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
# A DPO run with `reference: sft_merged` trains its adapter on base + the SFT adapter merged in, and keeps a copy of that
# SFT adapter in this subfolder of its output folder (`dpo.SFT_ADAPTER_COPY`, the same name): loading the DPO adapter
# means merging the SFT one first.
SFT_ADAPTER_COPY = "sft_adapter"
# TRL's name for the frozen copy of an adapter it trains from (DPO's reference), saved by peft in a subfolder of it.
REFERENCE_ADAPTER = "ref"


def sft_adapter_under(adapter: str | Path | None) -> Path | None:
    """The SFT adapter an adapter folder applies on top of (`<adapter>/sft_adapter/`, written by a DPO run with
    `reference: sft_merged`), or None for an adapter that applies on the base alone."""
    if adapter is None:
        return None
    path = Path(adapter) / SFT_ADAPTER_COPY
    return path if (path / ADAPTER_CONFIG).is_file() else None


def read_adapter_config(adapter: str | Path) -> dict[str, Any]:
    """The adapter's `adapter_config.json`; a clear error when the folder holds no adapter."""
    path = Path(adapter) / ADAPTER_CONFIG
    if not path.is_file():
        what = "does not exist" if not Path(adapter).exists() else f"holds no LoRA adapter (no {ADAPTER_CONFIG})"
        raise RecipeError(f"Adapter folder {adapter} {what}. Pass the `output_dir` of a LoRA/QLoRA training run.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RecipeError(f"{path} is not valid JSON: {error}") from None


def trains_in_4bit(settings: dict[str, Any]) -> bool:
    """Whether a recipe's fields load the base in 4 bit: a 4-bit `tuning_strategy` (qlora), else `load_in_4bit`."""
    strategy = STRATEGIES.get(settings.get("tuning_strategy") or "")
    return strategy.four_bit if strategy else bool(settings.get("load_in_4bit"))


def adapter_model_arguments(adapter: str | Path, base: str | None = None, **overrides: Any) -> ModelArguments:
    """Model settings to load an adapter's base: the base named in `adapter_config.json` (or `base`), and the model
    fields of the recipe saved with the adapter (revision, dtype, attention, image pixel bounds, 4-bit)."""
    from vlm_recipes.training.outputs import read_saved_recipe

    adapter_config = read_adapter_config(adapter)
    known = {f.name for f in fields(ModelArguments)}
    saved = read_saved_recipe(adapter)
    settings = {key: value for key, value in saved.items() if key in known}
    settings["load_in_4bit"] = trains_in_4bit(saved)  # evaluated and chatted with as trained
    settings["model_name_or_path"] = base or adapter_config.get("base_model_name_or_path")
    if not settings["model_name_or_path"]:
        raise RecipeError(f"{adapter}/{ADAPTER_CONFIG} names no base model; pass the base model's path or Hub id.")
    if base is None and adapter_config.get("revision"):
        settings.setdefault("model_revision", adapter_config["revision"])
    settings.update(overrides)
    return ModelArguments(**settings)


def _same_model(a: str, b: str) -> bool:
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def _architecture(config: Any) -> dict[str, Any]:
    text = config.get_text_config()
    return {
        "model_type": config.model_type,
        "hidden_size": getattr(text, "hidden_size", None),
        "num_hidden_layers": getattr(text, "num_hidden_layers", None),
    }


def check_adapter_fits(adapter: str | Path, config: Any, model_name: str, trust_remote_code: bool = False) -> None:
    """Refuse an adapter trained on another architecture, before any weights load. The base it names is compared
    with `model_name` when the two differ and its config can be read (offline, a Hub id may not be)."""
    recorded = read_adapter_config(adapter).get("base_model_name_or_path")
    if not recorded or _same_model(str(recorded), str(model_name)):
        return
    try:
        recorded_config = AutoConfig.from_pretrained(recorded, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        logger.info(
            "Could not read the config of %s, the adapter's base; its weights are checked on loading", recorded
        )
        return
    theirs, mine = _architecture(recorded_config), _architecture(config)
    differences = [f"{name} {theirs[name]} vs {mine[name]}" for name in theirs if theirs[name] != mine[name]]
    if differences:
        raise RecipeError(
            f"The adapter in {adapter} was trained on {recorded}, which does not match {model_name} "
            f"({', '.join(differences)}). Load it onto the model it was trained on."
        )


def load_adapter(model: Any, adapter: str | Path, model_name: str | None = None, *, trainable: bool = False) -> Any:
    """`model` with a saved LoRA adapter as its "default" adapter (a peft `PeftModel`), frozen for inference or
    `trainable` to train further; a clear error when it does not fit."""
    import warnings

    from peft import PeftModel

    recorded = read_adapter_config(adapter).get("base_model_name_or_path")
    trained_on = f" It was trained on {recorded}." if recorded else ""
    model_name = model_name or getattr(model, "name_or_path", None) or "this model"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
        except (ValueError, RuntimeError, KeyError) as error:
            cause = " ".join(str(error).split())[:400]
            raise RecipeError(f"The adapter in {adapter} does not fit {model_name}: {cause}.{trained_on}") from None
    for warning in caught:
        if "missing adapter keys" in str(warning.message):
            raise RecipeError(
                f"The adapter in {adapter} does not fit {model_name}: some of its weights have no place in the model "
                f"({str(warning.message)[:300]}).{trained_on}"
            )
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return peft_model


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
    if adapter is not None:
        config = load_config(model_args, trust_remote_code)
        for folder in (sft_adapter, adapter):
            if folder is not None:
                check_adapter_fits(folder, config, model_args.model_name_or_path, trust_remote_code)
    model, processor, family = load_model_and_processor(model_args, trust_remote_code, for_inference=True)
    if adapter is not None:
        if sft_adapter is not None:
            print_main(
                f"{adapter} applies on top of the SFT adapter in {sft_adapter}: merging that into the base first"
            )
            model = merge_adapter(model, sft_adapter, model_args.model_name_or_path)
        model = load_adapter(model, adapter, model_args.model_name_or_path)
        if any((Path(adapter) / name).is_file() for name in PROCESSOR_FILES):
            processor = load_processor(
                replace(model_args, model_name_or_path=str(adapter), model_revision=None), trust_remote_code, family
            )
    model.eval()
    return model, processor, family


def merge_adapter(model: Any, adapter_path: str | Path, model_name: str | None = None) -> Any:
    """`model` with a saved LoRA adapter merged into its weights, in place: one model, no adapter left."""
    if getattr(model, "is_loaded_in_4bit", False):
        raise RecipeError(
            "Merging an adapter into a 4-bit model rounds the merged weights back to 4 bit, so the result is not "
            "the adapter's model. Keep the adapter separate instead, or merge into a 16-bit model."
        )
    return load_adapter(model, adapter_path, model_name).merge_and_unload()
