"""A saved LoRA adapter on its base model: the fit check before any weights load, loading it (frozen or trainable),
merging it into the weights, and the base model's settings an adapter folder names (evaluation, chat and merge)."""

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from vlm_recipes.configs import ModelArguments
from vlm_recipes.errors import RecipeError
from vlm_recipes.modeling.strategies import loads_in_4bit
from vlm_recipes.run_folder import ADAPTER_CONFIG, read_adapter_config, read_saved_recipe


logger = logging.getLogger(__name__)


def adapter_model_arguments(adapter: str | Path, base: str | None = None, **overrides: Any) -> ModelArguments:
    """Model settings to load an adapter's base: the base named in `adapter_config.json` (or `base`), and the model
    fields of the recipe saved with the adapter (revision, dtype, attention, image pixel bounds, 4-bit)."""
    adapter_config = read_adapter_config(adapter)
    known = {f.name for f in fields(ModelArguments)}
    saved = read_saved_recipe(adapter)
    settings = {key: value for key, value in saved.items() if key in known}
    settings["load_in_4bit"] = loads_in_4bit(saved)  # evaluated and chatted with as trained
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


def merge_adapter(model: Any, adapter_path: str | Path, model_name: str | None = None) -> Any:
    """`model` with a saved LoRA adapter merged into its weights, in place: one model, no adapter left."""
    if getattr(model, "is_loaded_in_4bit", False):
        raise RecipeError(
            "Merging an adapter into a 4-bit model rounds the merged weights back to 4 bit, so the result is not "
            "the adapter's model. Keep the adapter separate instead, or merge into a 16-bit model."
        )
    return load_adapter(model, adapter_path, model_name).merge_and_unload()
