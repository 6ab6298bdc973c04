"""The model-family table: one row per family says where its parts live and how it trains.

Module paths are the names `model.named_modules()` gives on the model `AutoModelForImageTextToText` loads. Adding a
family is adding a row here, a tiny config in `vlm_recipes.modeling.tiny` and a recipe.
"""

import re
from dataclasses import dataclass
from typing import Any

from vlm_recipes.errors import RecipeError


LLM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]
    vision_tower: str
    projector: str
    language_model: str
    example_model: str
    # A chat template with `{% generation %}` markers, for assistant-only loss: "trl:<file>" is one of TRL's
    # `chat_templates/*_training.jinja` (TRL swaps it in itself when it recognises the stock template),
    # "vlm_recipes:<file>" one of ours in `vlm_recipes/chat_templates/`, None when no family template exists.
    training_template: str | None
    lm_head: str = "lm_head"
    lora_projections: tuple[str, ...] = LLM_PROJECTIONS
    notes: str = ""

    @property
    def language_model_layers(self) -> str:
        return f"{self.language_model}.layers"

    def lora_target_regex(self) -> str:
        """PEFT `target_modules` regex: every projection of every language-model layer, nothing in the vision tower."""
        projections = "|".join(self.lora_projections)
        return rf"^{re.escape(self.language_model_layers)}\.\d+\..*\b({projections})$"

    def quantization_skip_modules(self) -> list[str]:
        """Modules that stay in 16 bit under 4-bit loading: the vision tower, the projector and the output head."""
        return list(dict.fromkeys([self.vision_tower, self.projector, self.lm_head]))

    @staticmethod
    def canonical_name(name: str) -> str:
        """A parameter or module name as on the bare model: PEFT's wrapper segments removed."""
        name = name.removeprefix("base_model.model.")
        return _PEFT_SEGMENTS.sub("", name)

    def part_of(self, parameter_name: str) -> str:
        """'projector', 'vision_tower', 'language_model' or 'other' for a parameter (or module) name."""
        name = self.canonical_name(parameter_name)
        if _under(name, self.projector):
            return "projector"
        if _under(name, self.vision_tower):
            return "vision_tower"
        if _under(name, self.language_model) or _under(name, self.lm_head):
            return "language_model"
        return "other"


# peft inserts these between a wrapped module's name and its own parameters
_PEFT_SEGMENTS = re.compile(r"\.(modules_to_save\.[^.]+|original_module|base_layer)(?=\.|$)")


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


QWEN_VL_NOTE = "multimodal RoPE"

FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (
        ModelFamily(
            name="qwen2_vl",
            model_types=("qwen2_vl",),
            vision_tower="model.visual",
            projector="model.visual.merger",
            language_model="model.language_model",
            example_model="Qwen/Qwen2-VL-7B-Instruct",
            training_template="trl:qwen2_5_vl_training.jinja",
            notes=QWEN_VL_NOTE,
        ),
        ModelFamily(
            name="qwen2_5_vl",
            model_types=("qwen2_5_vl",),
            vision_tower="model.visual",
            projector="model.visual.merger",
            language_model="model.language_model",
            example_model="Qwen/Qwen2.5-VL-7B-Instruct",
            training_template="trl:qwen2_5_vl_training.jinja",
            notes=QWEN_VL_NOTE,
        ),
    )
}


def supported_families_text() -> str:
    return ", ".join(f"{family.name} (e.g. {family.example_model})" for family in FAMILIES.values())


def get_family(config_or_model: Any) -> ModelFamily:
    """The family row for a model or its config; a clear error listing the supported families otherwise."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise RecipeError(
        f"Model type '{model_type}' is not a supported vision-language family. Supported: {supported_families_text()}. "
        "To add one, add a row to FAMILIES in vlm_recipes/modeling/families.py (where its vision tower, projector "
        "and language-model layers live, and its training chat template), a tiny config in "
        "vlm_recipes/modeling/tiny.py, and a recipe."
    )
