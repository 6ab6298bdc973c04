"""Every shipped recipe and accelerate config parses; recipe fields are checked and overridable."""

from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

from vlm_recipes.dpo import DPORecipe
from vlm_recipes.errors import RecipeError
from vlm_recipes.evaluate import EvaluateRecipe
from vlm_recipes.preflight import DPOPreflightRecipe, SFTPreflightRecipe
from vlm_recipes.recipe import entry_point_of, parse_recipe, save_recipe
from vlm_recipes.sft import SFTRecipe


RECIPES = sorted((REPO_ROOT / "recipes").rglob("*.yaml"))
ACCELERATE_CONFIGS = sorted((REPO_ROOT / "accelerate_configs").glob("*.yaml"))


RECIPE_CLASSES = {"vlm_recipes.sft": SFTRecipe, "vlm_recipes.dpo": DPORecipe}


def recipe_class(path: Path) -> type:
    """The recipe class of the entry point a recipe is for: its `# entry point:` comment, or SFT."""
    return RECIPE_CLASSES[entry_point_of(path.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_recipe_parses(path):
    recipe = parse_recipe(recipe_class(path), [str(path)])
    assert recipe.model.model_name_or_path
    assert recipe.data.dataset_name
    assert recipe.training.output_dir
    content = yaml.safe_load(path.read_text())
    for key, value in content.items():
        assert recipe.settings[key] == value, key
    if "evaluation" in recipe.parts():  # an SFT recipe: its task, evaluation sets and prompt presets resolve
        from vlm_recipes.evaluation.sets import apply_task_defaults, resolve_eval_sets

        task = apply_task_defaults(recipe)
        assert resolve_eval_sets(recipe.data, recipe.evaluation) and recipe.data.formatter == task.formatter


# What each shipped config launches, and the test in tests/test_distributed.py that launches it for real.
EXERCISED_CONFIGS = {
    "single_gpu.yaml": ("NO", 1, "reference"),  # the one-process run the others are compared with
    "multi_gpu.yaml": ("MULTI_GPU", 1, "test_two_processes_train_like_one"),
    "multi_node.yaml": ("MULTI_GPU", 2, "test_two_machines_through_the_slurm_script"),
    "zero2.yaml": ("DEEPSPEED", 1, "test_zero2_trains_like_one_process"),
    "zero3.yaml": ("DEEPSPEED", 1, "test_zero3_trains_and_evaluates_like_one_process"),
    "fsdp.yaml": ("FSDP", 1, "test_fsdp_trains_like_one_process_on_gpus"),  # on CPUs: the refusal test
}


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_every_accelerate_config_loads_with_accelerates_loader(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.mixed_precision == "bf16"
    assert config.compute_environment.value == "LOCAL_MACHINE"
    distributed_type, machines, _ = EXERCISED_CONFIGS[path.name]  # a new config needs a run that exercises it
    assert config.distributed_type.value == distributed_type and config.num_machines == machines
    if distributed_type == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == int(path.stem[-1])
    if path.name == "zero3.yaml":
        assert config.deepspeed_config["zero3_save_16bit_model"] is True  # a full model saved as one safetensors file
    if path.name == "fsdp.yaml":
        assert config.fsdp_config["fsdp_version"] == 2


def test_every_accelerate_config_is_exercised():
    source = (REPO_ROOT / "tests" / "test_distributed.py").read_text()
    assert {path.name for path in ACCELERATE_CONFIGS} == set(EXERCISED_CONFIGS)
    for name, (_, _, test) in EXERCISED_CONFIGS.items():
        assert name in source, f"no test launches {name}"
        assert f"def {test}(" in source


def test_recipes_that_need_a_sharded_launch_name_it_with_memory_per_gpu():
    text = (REPO_ROOT / "recipes" / "chartqa_full.yaml").read_text()
    header = text[: text.index("\n\n")]
    assert "accelerate_configs/zero3.yaml" in header and "per GPU" in header and "Global batch" in header


def test_gpu_recipes_carry_a_memory_estimate():
    for path in RECIPES:
        if "demo" not in path.parts:
            assert "memory" in path.read_text().lower(), f"{path} says nothing about the memory it needs"


def test_overrides_and_yaml_number_strings(tmp_path):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(
        "model_name_or_path: m\ndataset_name: d\noutput_dir: o\nlearning_rate: 2e-4\nmax_steps: 5\n"
    )
    recipe = parse_recipe(SFTRecipe, [str(recipe_file), "--max_steps", "7", "--lora_r", "4"])
    assert recipe.training.learning_rate == pytest.approx(2e-4)  # YAML 1.1 reads `2e-4` as a string
    assert recipe.training.max_steps == 7 and recipe.model.lora_r == 4
    assert recipe.settings["max_steps"] == 7 and recipe.settings["lora_r"] == 4
    # `--config path` works as in TRL's scripts
    assert parse_recipe(SFTRecipe, ["--config", str(recipe_file)]).training.max_steps == 5


def test_unknown_fields_are_named_with_a_suggestion(tmp_path):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("model_name_or_path: m\nlerning_rate: 1.0e-4\n")
    with pytest.raises(RecipeError, match=r"r.yaml: unknown field 'lerning_rate'. Did you mean 'learning_rate'\?"):
        parse_recipe(SFTRecipe, [str(recipe_file)])
    with pytest.raises(RecipeError, match="command line: unknown field 'max_stepz'. Did you mean 'max_steps'"):
        parse_recipe(SFTRecipe, ["--max_stepz", "3"])


def test_a_renamed_field_names_its_new_name(tmp_path):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("model_name_or_path: m\neval_max_samples: 32\n")
    renamed = r"the field 'eval_max_samples' is now 'eval_generation_rows' \(the evaluation rows answers are generated"
    with pytest.raises(RecipeError, match=rf"r.yaml: {renamed}.*`max_eval_samples` still trims the split\)"):
        parse_recipe(SFTRecipe, [str(recipe_file)])
    with pytest.raises(RecipeError, match=f"command line: {renamed}"):
        parse_recipe(SFTRecipe, ["--eval_max_samples", "32"])
    assert parse_recipe(SFTRecipe, ["--eval_generation_rows", "32"]).evaluation.eval_generation_rows == 32
    # an entry point without the new field calls the old one unknown
    with pytest.raises(RecipeError, match="unknown field 'eval_max_samples'"):
        parse_recipe(DPORecipe, ["--eval_max_samples", "32"])


def test_each_entry_point_recipe_is_typed_by_its_parts():
    assert list(SFTRecipe.parts()) == [
        "data",
        "model",
        "tuning",
        "run",
        "training",
        "reliability",
        "speed",
        "evaluation",
    ]
    assert DPORecipe.parts()["training"].__name__ == "DPOConfig" and "policy" in DPORecipe.parts()
    recipe = parse_recipe(SFTRecipe, ["--output_dir", "o", "--learning_rate", "3e-4"])
    assert type(recipe.training).__name__ == "SFTConfig" and recipe.training.learning_rate == 3e-4
    assert recipe.settings == {"output_dir": "o", "learning_rate": 3e-4}
    assert not hasattr(recipe, "policy")


@pytest.mark.parametrize(
    "recipe_class",
    [SFTRecipe, DPORecipe, EvaluateRecipe, SFTPreflightRecipe, DPOPreflightRecipe],
    ids=lambda recipe_class: recipe_class.__name__,
)
def test_every_typed_recipe_names_a_wrong_type_in_one_line(tmp_path, recipe_class):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("model_name_or_path: m\nlearning_rate: abc\nlora_r: 8\n")
    with pytest.raises(RecipeError) as info:
        parse_recipe(recipe_class, [str(recipe_file)])
    assert str(info.value) == f"{recipe_file}: field 'learning_rate' is 'abc', which is not a number."
    with pytest.raises(
        RecipeError, match=r"^command line: argument --lora_r/--lora-r: invalid int value: 'x'\. `--help` lists"
    ):
        parse_recipe(recipe_class, ["--lora_r", "x"])


def test_saved_recipe_leaves_out_tokens(tmp_path):
    recipe = parse_recipe(
        SFTRecipe, ["--output_dir", "o", "--hub_token", "hf_secret123", "--max_steps", "3", "--max_new_tokens", "7"]
    )
    save_recipe(recipe, tmp_path / "recipe.yaml")
    text = (tmp_path / "recipe.yaml").read_text()
    assert "hf_secret123" not in text and "max_steps: 3" in text
    assert "max_new_tokens: 7" in text  # a setting with "token" in its name is still part of the recipe as run
