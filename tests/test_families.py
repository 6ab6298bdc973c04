"""The family table against the real module names of the installed transformers, on every family's tiny model."""

import json
import logging
import re
import shutil

import pytest
import torch
from conftest import REPO_ROOT, trainer_for
from PIL import Image
from transformers import AutoModelForImageTextToText
from transformers.quantizers.quantizers_utils import should_convert_module

from vlm_recipes.configs import ModelArguments, TuningArguments
from vlm_recipes.errors import RecipeError
from vlm_recipes.modeling.base_model import load_config, load_processor
from vlm_recipes.modeling.families import FAMILIES, get_family
from vlm_recipes.modeling.setup import check_family_settings, resolve_model_setup
from vlm_recipes.modeling.strategies import apply_strategy, resolve_strategy
from vlm_recipes.recipe import parse_recipe
from vlm_recipes.sft import SFTRecipe
from vlm_recipes.testing.tiny_models import TINY_BUILDERS


FAMILY_NAMES = sorted(FAMILIES)
PARTS = ("vision_tower", "projector", "language_model")


def test_every_family_has_a_tiny_builder():
    assert set(FAMILIES) <= set(TINY_BUILDERS)


@pytest.fixture(scope="module")
def bare_model(tiny_models):
    """family -> its tiny model, loaded once (tests that change it load their own)."""
    loaded = {}

    def get(family):
        if family not in loaded:
            loaded[family] = AutoModelForImageTextToText.from_pretrained(tiny_models(family))
        return loaded[family]

    return get


@pytest.mark.parametrize("family_name", FAMILY_NAMES)
def test_every_parameter_belongs_to_exactly_one_part(bare_model, family_name):
    family, model = FAMILIES[family_name], bare_model(family_name)
    assert get_family(model) is family
    names = [name for name, _ in model.named_parameters()]
    parts = {name: family.part_of(name) for name in names}
    for part in PARTS:
        assert any(p == part for p in parts.values()), f"no parameter in the {part}"
    # "other" only for modules the row names explicitly (nothing falls through unnoticed)
    unexplained = [
        n for n, p in parts.items() if p == "other" and not any(n.startswith(o + ".") for o in family.other)
    ]
    assert unexplained == []
    # Every prefix in the row names a real module or parameter of the model
    real = {name for name, _ in model.named_modules()} | set(names)
    for part in (*PARTS, "other"):
        for prefix in family.prefixes(part):
            assert prefix in real or prefix == family.lm_head, f"{part} prefix {prefix!r} names nothing"
    # The decoder layers sit where the row says, as many as the config says
    layer_indexes = {int(m.group(1)) for n in names if (m := re.match(rf"{family.language_model_layers}\.(\d+)\.", n))}
    assert layer_indexes == set(range(model.config.get_text_config().num_hidden_layers))


@pytest.mark.parametrize("family_name", FAMILY_NAMES)
def test_lora_covers_every_language_model_projection_and_nothing_else(tiny_models, family_name):
    family = FAMILIES[family_name]
    model = AutoModelForImageTextToText.from_pretrained(tiny_models(family_name))
    linear_by_layer: dict[int, set[str]] = {}
    for name, module in model.named_modules():
        match = re.match(rf"{re.escape(family.language_model_layers)}\.(\d+)\.(.+)$", name)
        if match and isinstance(module, torch.nn.Linear):
            linear_by_layer.setdefault(int(match.group(1)), set()).add(match.group(2))
    experts_by_layer = {
        int(m.group(1))
        for name, _ in model.named_parameters()
        if (m := re.match(rf"{re.escape(family.language_model_layers)}\.(\d+)\..*experts\.", name))
    }
    model_args = ModelArguments(model_name_or_path=str(tiny_models(family_name)), lora_dropout=0.0)
    plan = resolve_strategy(TuningArguments(tuning_strategy="lora"), model_args, model.config, family, 1e-4)
    peft_model = apply_strategy(model, plan, model_args, family)

    wrapped = {family.canonical_name(name) for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped and all(family.part_of(name) == "language_model" for name in wrapped)
    assert all(name.startswith(family.language_model_layers + ".") for name in wrapped)
    num_layers = model.config.get_text_config().num_hidden_layers
    for layer in range(num_layers):
        prefix = f"{family.language_model_layers}.{layer}."
        in_layer = {name.removeprefix(prefix) for name in wrapped if name.startswith(prefix)}
        # every linear projection of the layer (attention, linear attention, MLP, per-layer input)
        assert linear_by_layer[layer] <= in_layer, f"layer {layer}: no LoRA on {linear_by_layer[layer] - in_layer}"
        if layer in experts_by_layer:  # the fused experts, through peft's target_parameters
            assert any(name.endswith("experts") for name in in_layer), f"layer {layer}: experts not adapted"
    if family.uses_fused_experts(model):
        assert experts_by_layer == set(range(num_layers))
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


@pytest.mark.parametrize("family_name", FAMILY_NAMES)
def test_4_bit_keeps_vision_tower_and_projector_in_16_bit(bare_model, family_name):
    """transformers' own matching of `llm_int8_skip_modules`, on every linear layer of the real module tree."""
    family, model = FAMILIES[family_name], bare_model(family_name)
    skip = family.quantization_skip_modules()
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    for name in linear:
        quantized = should_convert_module(name, skip)
        if family.part_of(name) == "language_model" and name != family.lm_head:
            assert quantized, f"{name} would stay 16-bit"
        else:  # vision tower, projector, `other` modules, output head
            assert not quantized, f"{name} would be quantized"
    names = [name for name, _ in model.named_modules()] + [name for name, _ in model.named_parameters()]
    for pattern in skip:  # each skip pattern matches something real (a bare "visual" would match nothing)
        assert any(not should_convert_module(name, [pattern]) for name in names), pattern


def test_an_unsupported_model_gets_the_families_and_how_to_add_one(chartqa_dir, tmp_path):
    folder = tmp_path / "paligemma"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "paligemma"}))
    with pytest.raises(RecipeError) as info:
        trainer_for(folder, chartqa_dir, tmp_path / "out")
    message = str(info.value)
    assert "Model type 'paligemma' is not a supported vision-language family" in message
    assert all(name in message for name in FAMILIES) and "add a row to FAMILIES" in message


@pytest.fixture
def config_only(tiny_models, tmp_path):
    """family -> its tiny model's folder without weights: what passes must be checked before any weights load."""

    def get(family):
        folder = tmp_path / family
        shutil.copytree(tiny_models(family), folder)
        (folder / "model.safetensors").unlink()
        return folder

    return get


def test_moe_lora_needs_no_dropout_and_says_so_before_weights_load(config_only, chartqa_dir, tmp_path):
    with pytest.raises(RecipeError, match=r"qwen3_vl_moe is a mixture of experts: .* needs `lora_dropout: 0`"):
        trainer_for(config_only("qwen3_vl_moe"), chartqa_dir, tmp_path / "out", "--lora_dropout", "0.05")


def test_gemma4_moe_gets_lora_on_its_experts_and_the_4_bit_warning_and_dense_gemma4_neither(tiny_models, caplog):
    """One row for both Gemma 4 kinds: the experts (and what they imply) only where the config turns them on."""
    family = FAMILIES["gemma4"]
    dense, moe = (
        load_config(ModelArguments(model_name_or_path=str(tiny_models(f)))) for f in ("gemma4", "gemma4_moe")
    )
    assert get_family(moe) is family
    assert family.lora_target_parameters(dense) is None and not family.uses_fused_experts(dense)
    assert family.lora_target_parameters(moe) == ["experts.gate_up_proj", "experts.down_proj"]

    def settings(**fields):
        return ModelArguments(model_name_or_path="m", use_peft=True, dtype="bfloat16", **fields)

    caplog.set_level(logging.WARNING, logger="vlm_recipes.modeling.setup")
    check_family_settings(settings(load_in_4bit=True, lora_dropout=0.05), family, dense)
    assert "fused expert weights" not in caplog.text
    check_family_settings(settings(load_in_4bit=True, lora_dropout=0.0), family, moe)
    assert "the fused expert weights of gemma4 (most of its parameters) stay in bfloat16" in caplog.text
    with pytest.raises(RecipeError, match=r"gemma4 is a mixture of experts: .* needs `lora_dropout: 0`"):
        check_family_settings(settings(lora_dropout=0.05), family, moe)


# ---------------------------------------------------------------------------------------------------------------------
# image_min_pixels / image_max_pixels in each family's image-size rule


def processor_with(model_dir, **bounds):
    model_args = ModelArguments(model_name_or_path=str(model_dir), **bounds)
    return load_processor(model_args, get_family(load_config(model_args)))


def image_tokens(processor, size):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = processor(text=[prompt], images=[Image.new("RGB", size, "white")], return_tensors="pt")
    return int((batch["input_ids"] == processor.image_token_id).sum())


@pytest.mark.parametrize("family_name", ["qwen3_vl", "qwen3_5"])
def test_qwen3_pixel_bounds_set_the_image_area(tiny_models, family_name):
    processor = processor_with(tiny_models(family_name), image_max_pixels=64 * 32 * 32)
    assert processor.image_processor.size["longest_edge"] == 64 * 32 * 32
    assert image_tokens(processor, (1000, 800)) <= 64  # one token per 32x32 pixels


def test_smolvlm_max_pixels_lowers_the_longest_edge_to_whole_tiles(tiny_models):
    folder = tiny_models("smolvlm")
    full = processor_with(folder)
    bounded = processor_with(folder, image_max_pixels=200 * 200)  # 2 tiles of 84 fit in 200 pixels
    assert bounded.image_processor.size == {"longest_edge": 168}
    assert image_tokens(bounded, (400, 300)) < image_tokens(full, (400, 300))
    with pytest.raises(RecipeError, match="below one 84x84 tile"):
        processor_with(folder, image_max_pixels=80 * 80)
    with pytest.raises(RecipeError, match="`image_min_pixels` does not apply to smolvlm"):
        processor_with(folder, image_min_pixels=100)


def test_gemma4_max_pixels_picks_the_soft_token_budget(tiny_models):
    folder = tiny_models("gemma4")
    processor = processor_with(folder, image_max_pixels=200_000)  # 140 tokens of 48x48 pixels = 322,560 > 200,000
    assert processor.image_processor.max_soft_tokens == 70
    assert image_tokens(processor, (1200, 900)) <= 70
    with pytest.raises(RecipeError, match="smallest image budget: 70 tokens"):
        processor_with(folder, image_max_pixels=100_000)


@pytest.mark.parametrize("family_name", ["llava", "llava_next", "gemma3"])
def test_fixed_size_families_refuse_pixel_bounds_with_the_reason(tiny_models, family_name):
    with pytest.raises(RecipeError, match=f"`image_max_pixels` does not apply to {family_name}"):
        processor_with(tiny_models(family_name), image_max_pixels=500_000)


# ---------------------------------------------------------------------------------------------------------------------
# The shipped recipe of every family


def family_recipe(family_name):
    return REPO_ROOT / "recipes" / ("chartqa.yaml" if family_name == "qwen2_5_vl" else f"{family_name}.yaml")


@pytest.mark.parametrize("family_name", FAMILY_NAMES)
def test_each_family_recipe_passes_its_family_checks(tiny_models, family_name):
    """The real recipe's settings, on the family's tiny model: strategy, LoRA settings and image bounds all accepted."""
    family, path = FAMILIES[family_name], family_recipe(family_name)
    assert f"model_name_or_path: {family.example_model}\n" in path.read_text()  # the real model id
    recipe = parse_recipe(SFTRecipe, [str(path), "--model_name_or_path", str(tiny_models(family_name))])
    setup = resolve_model_setup(recipe.model, recipe.tuning, recipe.training.learning_rate, set(recipe.settings))
    assert setup.family is family
    processor = setup.load_processor()
    if recipe.model.image_max_pixels is not None:  # a bound in the family's own terms took effect
        assert (
            processor.image_processor.to_dict()
            != load_processor(
                ModelArguments(model_name_or_path=str(tiny_models(family_name))), family
            ).image_processor.to_dict()
        )


def test_smolvlm2_architecture_shares_the_smolvlm_row(tiny_models):
    """SmolVLM2 (model type `smolvlm`) has the module tree of SmolVLM/Idefics3, which the tiny model builds."""
    from transformers import SmolVLMConfig

    settings = json.loads((tiny_models("smolvlm") / "config.json").read_text())
    for key in ("model_type", "architectures", "transformers_version"):
        settings.pop(key, None)
    model = AutoModelForImageTextToText.from_config(SmolVLMConfig(**settings))
    family = get_family(model)
    assert family.name == "smolvlm" and type(model).__name__ == "SmolVLMForConditionalGeneration"
    assert {family.part_of(name) for name, _ in model.named_parameters()} == set(PARTS)
    targets = [name for name, _ in model.named_modules() if re.fullmatch(family.lora_target_regex(), name)]
    assert len(targets) == 7 * model.config.text_config.num_hidden_layers
