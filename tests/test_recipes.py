"""Every shipped recipe and accelerate config parses; recipe fields are checked and overridable."""

from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

from vlm_recipes.errors import RecipeError
from vlm_recipes.recipe import entry_point_of, parse_recipe, save_recipe
from vlm_recipes.sft import RECIPE_PARTS as SFT_PARTS


RECIPES = sorted((REPO_ROOT / "recipes").rglob("*.yaml"))
ACCELERATE_CONFIGS = sorted((REPO_ROOT / "accelerate_configs").glob("*.yaml"))


def recipe_parts(path: Path) -> dict:
    """The entry point a recipe is for: its `# entry point:` comment, or SFT."""
    import importlib

    return importlib.import_module(entry_point_of(path.read_text(encoding="utf-8"))).RECIPE_PARTS


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_recipe_parses(path):
    recipe = parse_recipe(recipe_parts(path), [str(path)])
    assert recipe.model.model_name_or_path
    assert recipe.data.dataset_name
    assert recipe.training.output_dir
    content = yaml.safe_load(path.read_text())
    for key, value in content.items():
        assert recipe.settings[key] == value, key


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_every_accelerate_config_loads_with_accelerates_loader(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.mixed_precision == "bf16"
    assert config.compute_environment.value == "LOCAL_MACHINE"


def test_gpu_recipes_carry_a_memory_estimate():
    for path in RECIPES:
        if "demo" not in path.parts:
            assert "memory" in path.read_text().lower(), f"{path} says nothing about the memory it needs"


def test_overrides_and_yaml_number_strings(tmp_path):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(
        "model_name_or_path: m\ndataset_name: d\noutput_dir: o\nlearning_rate: 2e-4\nmax_steps: 5\n"
    )
    recipe = parse_recipe(SFT_PARTS, [str(recipe_file), "--max_steps", "7", "--lora_r", "4"])
    assert recipe.training.learning_rate == pytest.approx(2e-4)  # YAML 1.1 reads `2e-4` as a string
    assert recipe.training.max_steps == 7 and recipe.model.lora_r == 4
    assert recipe.settings["max_steps"] == 7 and recipe.settings["lora_r"] == 4
    # `--config path` works as in TRL's scripts
    assert parse_recipe(SFT_PARTS, ["--config", str(recipe_file)]).training.max_steps == 5


def test_unknown_fields_are_named_with_a_suggestion(tmp_path):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("model_name_or_path: m\nlerning_rate: 1.0e-4\n")
    with pytest.raises(RecipeError, match=r"r.yaml: unknown field 'lerning_rate'. Did you mean 'learning_rate'\?"):
        parse_recipe(SFT_PARTS, [str(recipe_file)])
    with pytest.raises(RecipeError, match="command line: unknown field 'max_stepz'. Did you mean 'max_steps'"):
        parse_recipe(SFT_PARTS, ["--max_stepz", "3"])


def test_saved_recipe_leaves_out_tokens(tmp_path):
    recipe = parse_recipe(SFT_PARTS, ["--output_dir", "o", "--hub_token", "hf_secret123", "--max_steps", "3"])
    save_recipe(recipe, tmp_path / "recipe.yaml")
    text = (tmp_path / "recipe.yaml").read_text()
    assert "hf_secret123" not in text and "max_steps: 3" in text
