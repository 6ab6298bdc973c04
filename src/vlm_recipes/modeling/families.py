"""The model-family table: one row per family says where its parts live and how it trains.

Module paths are the names `model.named_modules()` gives on the model `AutoModelForImageTextToText` loads (checked on
the installed transformers by `tests/test_families.py` for every row). Every parameter of a loaded model belongs to
exactly one part:

- `projector`: the modules that map vision features into the language model's embedding space (checked first, since
  Qwen's sits inside its vision tower);
- `vision_tower`: the image encoder;
- `language_model`: the decoder (token embeddings, its layers under `language_model_layers`, the final norm) and the
  output head;
- `other`: modules the row names explicitly that are none of these (Gemma 4's audio tower).

Adding a family is adding a row here, a tiny builder in `vlm_recipes.testing.tiny_models` and a recipe.
"""

import re
from dataclasses import dataclass
from typing import Any

from vlm_recipes.errors import RecipeError


LLM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Qwen3.5's linear-attention (Gated DeltaNet) layers, next to its full-attention ones
LINEAR_ATTENTION_PROJECTIONS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
# Gemma 4's per-layer embedding (PLE) gate and projection inside each decoder layer
PER_LAYER_INPUT_PROJECTIONS = ("per_layer_input_gate", "per_layer_projection")

# How a family's image processor bounds the image size, and so the image tokens (`image_min_pixels`/`image_max_pixels`
# are translated by `vlm_recipes.modeling.image_size`):
PIXEL_AREA = "pixel_area"  # Qwen-VL: `size` shortest_edge/longest_edge are pixel areas; tokens follow the area
LONGEST_EDGE = "longest_edge"  # Idefics3/SmolVLM: every image is resized to `size.longest_edge`, then tiled
GRID_PINPOINTS = "grid_pinpoints"  # LLaVA-Next: the image is fitted to one of `image_grid_pinpoints`, then tiled
SOFT_TOKENS = "soft_tokens"  # Gemma 4: `max_soft_tokens` (70, 140, 280, 560 or 1120) per image
FIXED = "fixed"  # LLaVA 1.5, Gemma 3: every image is resized to one square size; a fixed token count


NO_PACKED_ROWS = "its forward has no tested way to keep packed rows apart"


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]
    vision_tower: str
    projector: tuple[str, ...]
    language_model: str
    example_model: str
    # A chat template with `{% generation %}` markers, for assistant-only loss: "trl:<file>" is one of TRL's
    # `chat_templates/*_training.jinja` (TRL swaps it in itself when it recognises the stock template),
    # "vlm_recipes:<file>" one of ours in `vlm_recipes/chat_templates/` (see `vlm_recipes.modeling.chat_templates`),
    # None when no family template exists.
    training_template: str | None
    # The model's own (stock) chat templates that `training_template` was written for, for ours only ("trl:<file>" or
    # "vlm_recipes:<file>"): a model whose template is one of these gets ours without a warning.
    stock_templates: tuple[str, ...] = ()
    lm_head: str = "lm_head"
    other: tuple[str, ...] = ()
    # LoRA on the language model: these linear projections in every decoder layer ...
    lora_projections: tuple[str, ...] = LLM_PROJECTIONS
    # ... and these fused expert weights (3-D `nn.Parameter`s, not `nn.Linear`), through peft's `target_parameters`.
    lora_expert_parameters: tuple[str, ...] = ()
    # The text-config flag that gives the decoder layers those experts, where the family also has dense checkpoints
    # (Gemma 4: `enable_moe_block` in 26B-A4B, not in E2B/E4B); None: every checkpoint of the family has them.
    expert_config_flag: str | None = None
    image_size: str = PIXEL_AREA
    # Why rows packed into one sequence (`padding_free`, `max_tokens_per_batch`) would not stay apart in this family's
    # forward; None where they do, per-row log-probabilities checked against the rows run alone
    # (`training.padding_free`: per-row multimodal RoPE ids with a text row for Qwen-VL, per-row positions elsewhere).
    padding_free_refusal: str | None = NO_PACKED_ROWS

    @property
    def language_model_layers(self) -> str:
        return f"{self.language_model}.layers"

    def fused_expert_parameters(self, config_or_model: Any) -> tuple[str, ...]:
        """The fused expert weights a model (or config) of this family has: none for a dense checkpoint."""
        config = getattr(config_or_model, "config", config_or_model)
        if self.expert_config_flag and not getattr(config.get_text_config(), self.expert_config_flag, False):
            return ()
        return self.lora_expert_parameters

    def uses_fused_experts(self, config_or_model: Any) -> bool:
        """Whether this model (or config) is a mixture of experts with fused expert weights."""
        return bool(self.fused_expert_parameters(config_or_model))

    def lora_target_regex(self) -> str:
        """PEFT `target_modules` regex: every projection of every language-model layer, nothing in the vision tower."""
        projections = "|".join(self.lora_projections)
        return rf"^{re.escape(self.language_model_layers)}\.\d+\.(.*\.)?({projections})$"

    def lora_target_parameters(self, config_or_model: Any) -> list[str] | None:
        """PEFT `target_parameters`: the fused expert weights of a mixture-of-experts language model (None otherwise)."""
        return list(self.fused_expert_parameters(config_or_model)) or None

    def quantization_skip_modules(self) -> list[str]:
        """Modules that stay in 16 bit under 4-bit loading: vision tower, projector, `other` modules, output head."""
        return list(dict.fromkeys([self.vision_tower, *self.projector, *self.other, self.lm_head]))

    def prefixes(self, part: str) -> tuple[str, ...]:
        """The module-name prefixes of a part: 'vision_tower', 'projector', 'language_model' or 'other'."""
        return {
            "vision_tower": (self.vision_tower,),
            "projector": self.projector,
            "language_model": (self.language_model, self.lm_head),
            "other": self.other,
        }[part]

    @staticmethod
    def canonical_name(name: str) -> str:
        """A parameter or module name as on the bare model: PEFT's wrapper segments removed."""
        name = name.removeprefix("base_model.model.")
        return _PEFT_SEGMENTS.sub("", name)

    def part_of(self, parameter_name: str) -> str:
        """'projector', 'vision_tower', 'language_model' or 'other' for a parameter (or module) name."""
        name = self.canonical_name(parameter_name)
        for part in ("projector", "vision_tower", "language_model"):
            if any(_under(name, prefix) for prefix in self.prefixes(part)):
                return part
        return "other"


# peft inserts these between a wrapped module's name and its own parameters
_PEFT_SEGMENTS = re.compile(r"\.(modules_to_save\.[^.]+|original_module|base_layer)(?=\.|$)")


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (
        ModelFamily(
            name="qwen2_vl",
            model_types=("qwen2_vl",),
            vision_tower="model.visual",
            projector=("model.visual.merger",),
            language_model="model.language_model",
            example_model="Qwen/Qwen2-VL-7B-Instruct",
            training_template="trl:qwen2_5_vl_training.jinja",
            padding_free_refusal=None,
        ),
        ModelFamily(
            name="qwen2_5_vl",
            model_types=("qwen2_5_vl",),
            vision_tower="model.visual",
            projector=("model.visual.merger",),
            language_model="model.language_model",
            example_model="Qwen/Qwen2.5-VL-7B-Instruct",
            training_template="trl:qwen2_5_vl_training.jinja",
            padding_free_refusal=None,
        ),
        ModelFamily(
            name="qwen3_vl",
            model_types=("qwen3_vl",),
            vision_tower="model.visual",
            # DeepStack: besides the final merger, mergers of intermediate vision layers feed early decoder layers
            projector=("model.visual.merger", "model.visual.deepstack_merger_list"),
            language_model="model.language_model",
            example_model="Qwen/Qwen3-VL-8B-Instruct",
            training_template="trl:qwen3_vl_training.jinja",
            padding_free_refusal=None,
        ),
        ModelFamily(
            name="qwen3_vl_moe",
            model_types=("qwen3_vl_moe",),
            vision_tower="model.visual",
            projector=("model.visual.merger", "model.visual.deepstack_merger_list"),
            language_model="model.language_model",
            example_model="Qwen/Qwen3-VL-30B-A3B-Instruct",
            training_template="trl:qwen3_vl_training.jinja",
            # Attention projections as nn.Linear; the experts' weights are fused 3-D parameters per layer. The router
            # (`mlp.gate`) stays frozen: LoRA on routing destabilises expert load balance.
            lora_projections=("q_proj", "k_proj", "v_proj", "o_proj"),
            lora_expert_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
            padding_free_refusal=None,
        ),
        ModelFamily(
            name="qwen3_5",
            model_types=("qwen3_5",),
            vision_tower="model.visual",
            projector=("model.visual.merger",),
            language_model="model.language_model",
            example_model="Qwen/Qwen3.5-27B",
            # labels an empty <think></think> block before each answer; qwen3_5_nothink_training.jinja for <= 2B
            training_template="trl:qwen3_5_think_training.jinja",
            lora_projections=LLM_PROJECTIONS + LINEAR_ATTENTION_PROJECTIONS,
            # 3 linear-attention (Gated DeltaNet) layers per full-attention layer
            padding_free_refusal="its linear-attention (Gated DeltaNet) layers carry a recurrent state along the "
            "sequence, which would run from one packed row into the next",
        ),
        ModelFamily(
            name="smolvlm",
            model_types=("smolvlm", "idefics3"),  # SmolVLM2 / SmolVLM and Idefics3
            vision_tower="model.vision_model",
            projector=("model.connector",),
            language_model="model.text_model",
            example_model="HuggingFaceTB/SmolVLM-Instruct",
            training_template="trl:smolvlm_training.jinja",  # idefics3_training.jinja for Idefics3-8B
            image_size=LONGEST_EDGE,  # images tiled into 384x384 crops plus a global view
            padding_free_refusal=None,
        ),
        ModelFamily(
            name="llava",
            model_types=("llava",),
            vision_tower="model.vision_tower",
            projector=("model.multi_modal_projector",),
            language_model="model.language_model",
            example_model="llava-hf/llava-1.5-7b-hf",
            # The stock llava-hf template marks the answer but has no end-of-turn token, so the model would never
            # learn to stop; ours ends each answer with </s> (as LLaVA 1.5 was trained) inside the markers.
            training_template="vlm_recipes:llava_1_5_training.jinja",
            stock_templates=("vlm_recipes:llava_1_5.jinja",),
            image_size=FIXED,  # one 336x336 image = 576 tokens
            padding_free_refusal=None,
        ),
        ModelFamily(
            name="llava_next",
            model_types=("llava_next",),
            vision_tower="model.vision_tower",
            # `image_newline` is a learned vector (a bare parameter) the projector's output rows end with
            projector=("model.multi_modal_projector", "model.image_newline"),
            language_model="model.language_model",
            example_model="llava-hf/llava-v1.6-mistral-7b-hf",
            training_template="trl:llava_next_training.jinja",
            image_size=GRID_PINPOINTS,  # AnyRes tiling: up to 5 x 576 image tokens per image
            padding_free_refusal=None,
        ),
        ModelFamily(
            name="gemma3",
            model_types=("gemma3",),
            vision_tower="model.vision_tower",
            projector=("model.multi_modal_projector",),
            language_model="model.language_model",
            example_model="google/gemma-3-4b-it",
            training_template="trl:gemma3_training.jinja",
            image_size=FIXED,  # one 896x896 image = 256 tokens
            # measured: packed rows' answer log-probabilities move by ~0.04 against the rows run alone
            padding_free_refusal="its image tokens attend to each other both ways through a mask transformers builds "
            "per padded row, which does not keep packed rows apart",
        ),
        ModelFamily(
            name="gemma4",
            model_types=("gemma4",),
            vision_tower="model.vision_tower",
            projector=("model.embed_vision",),
            language_model="model.language_model",
            example_model="google/gemma-4-E4B-it",
            # TRL 1.16 has no Gemma 4 training template: ours marks the model turn of the stock template
            training_template="vlm_recipes:gemma4_training.jinja",
            stock_templates=tuple(
                f"trl:{name}.jinja" for name in ("gemma4", "gemma4_v2", "gemma4_v3", "gemma4_v4", "gemma4_v5")
            ),
            other=("model.audio_tower", "model.embed_audio"),  # audio input: unused by image training
            lora_projections=LLM_PROJECTIONS + PER_LAYER_INPUT_PROJECTIONS,
            # 26B-A4B (mixture of experts): fused experts beside each layer's dense MLP; the router (`router.proj`)
            # stays frozen. The dense E2B/E4B have none (`enable_moe_block` off).
            lora_expert_parameters=("experts.gate_up_proj", "experts.down_proj"),
            expert_config_flag="enable_moe_block",
            image_size=SOFT_TOKENS,
            padding_free_refusal=None,
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
        "and language-model layers live, and its training chat template), a tiny builder in "
        "vlm_recipes/testing/tiny_models.py, and a recipe."
    )
