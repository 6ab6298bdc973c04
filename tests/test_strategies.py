"""Tuning strategies: after real optimizer steps exactly the intended parameters changed, with the configured rates."""

import re
import shutil

import pytest
import torch
from conftest import REPO_ROOT, assert_clear_error, run_in_process
from transformers import AutoModelForImageTextToText, TrainerCallback

from vlm_recipes.configs import ModelArguments, TuningArguments
from vlm_recipes.errors import RecipeError
from vlm_recipes.modeling.families import FAMILIES
from vlm_recipes.modeling.strategies import STRATEGIES, apply_strategy, resolve_strategy
from vlm_recipes.recipe import parse_recipe
from vlm_recipes.sft import SFTRecipe, build_trainer
from vlm_recipes.testing.tiny_models import TINY_BUILDERS


FAMILIES_WITH_TINY_MODELS = [name for name in FAMILIES if name in TINY_BUILDERS]
RATES = {"learning_rate": 1e-3, "learning_rate_llm": 2e-3, "learning_rate_vit": 3e-3, "learning_rate_projector": 4e-3}
PART_RATE = {"language_model": 2e-3, "vision_tower": 3e-3, "projector": 4e-3, "other": 1e-3}


def build(model_dir, data_dir, output_dir, *extra):
    recipe = parse_recipe(
        SFTRecipe,
        [
            "--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir), "--output_dir", str(output_dir),
            "--max_train_samples", "4", "--report_to", "none", "--bf16", "false", "--dtype", "float32",
            "--lr_scheduler_type", "constant", "--weight_decay", "0.1", "--lora_dropout", "0", "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--save_strategy", "no", "--logging_steps", "1",
            # Both steps see all four rows in the same order for every strategy (a tiny MoE's experts must each get
            # tokens for their LoRA weights to move): batching order is not what these tests are about.
            "--train_sampling_strategy", "random",
            *map(str, extra),
        ],
    )  # fmt: skip
    return build_trainer(recipe)


def snapshot(model):
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


class Snapshots(TrainerCallback):
    """Parameter values after each optimizer step of a real `trainer.train()`."""

    def __init__(self, model):
        self.model, self.by_step = model, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.by_step[state.global_step] = snapshot(self.model)


def train_and_snapshot(trainer):
    snapshots = Snapshots(trainer.model)
    snapshots.by_step[0] = snapshot(trainer.model)
    trainer.add_callback(snapshots)
    trainer.train()
    return snapshots.by_step


def layer_of(canonical, family):
    match = re.match(rf"{re.escape(family.language_model_layers)}\.(\d+)\.", canonical)
    return int(match.group(1)) if match else None


def should_train(name, strategy, family, frozen_layers=0, vision_lora=False, train_projector=False):
    """The test's own statement of each strategy's table row (independent of the product's implementation)."""
    part, canonical = family.part_of(name), family.canonical_name(name)
    if ".original_module." in name:
        return False
    if part == "other":  # modules that are none of the three parts (Gemma 4's audio tower) train under `full` only
        return strategy == "full"
    if strategy in ("qlora", "lora", "lora_llm_full_vit"):
        if "lora_" in name:
            return part == "language_model" or (vision_lora and part == "vision_tower")
        full_parts = {"vision_tower", "projector"} if strategy == "lora_llm_full_vit" else set()
        if train_projector:
            full_parts.add("projector")
        return "modules_to_save" in name and part in full_parts
    if part in ("vision_tower", "projector"):
        return strategy in ("partial_llm_full_vit", "vit_only", "full") or (
            strategy == "projector_only" and part == "projector"
        )
    if strategy == "full":
        return True
    if strategy == "partial_llm_full_vit":
        layer = layer_of(canonical, family)
        if layer is None:
            return "embed" not in canonical or frozen_layers == 0
        return layer >= frozen_layers
    return False


@pytest.fixture(scope="module")
def unused_in_forward(tiny_models, chartqa_dir, tmp_path_factory):
    """family -> parameters (as named on the bare model) that no gradient reaches from a training batch, because the
    model's forward never uses them: LLaVA's last CLIP layer (features are read at vision_feature_layer -2) and CLIP's
    post-layernorm, Gemma 3's SigLIP pooling head, Gemma 4's audio tower on image data. No strategy can change them."""
    found = {}

    def get(family_name):
        if family_name not in found:
            output_dir = tmp_path_factory.mktemp("reach") / "out"
            trainer = build(tiny_models(family_name), chartqa_dir, output_dir, "--tuning_strategy", "full")
            batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
            trainer.model(**batch).loss.backward()
            found[family_name] = {name for name, p in trainer.model.named_parameters() if p.grad is None}
        return found[family_name]

    return get


def on_unused_module(name, family, unused):
    """A parameter the forward never uses, or a LoRA matrix on a module it never uses."""
    canonical = family.canonical_name(name)
    module = re.sub(r"\.lora_[AB]\.[^.]+\.weight$", "", canonical)
    return (f"{module}.weight" if module != canonical else canonical) in unused


CASES = [
    ("qlora", []),
    ("qlora", ["--train_projector", "true", "--vision_lora_r", "4"]),
    ("lora", []),
    ("lora_llm_full_vit", []),
    ("partial_llm_full_vit", ["--llm_frozen_layers", "1"]),
    ("vit_only", []),
    ("projector_only", []),
    ("full", []),
]


def _strategy_matrix() -> list:
    """Every strategy case on every family. `make test` runs every case on Qwen2.5-VL and, for the other families, a
    third of the cases in rotation (each case on at least three other families, each family on three cases); the
    rest is marked `extended` (`make test-extended` runs the whole matrix)."""
    params = []
    for family_index, family_name in enumerate(FAMILIES_WITH_TINY_MODELS):
        for case_index, (strategy, extra) in enumerate(CASES):
            in_make_test = family_name == "qwen2_5_vl" or (family_index + case_index) % 3 == 0
            case_id = f"{strategy}-{'-'.join(extra)[2:] or 'plain'}-{family_name}"
            marks = () if in_make_test else (pytest.mark.extended,)
            params.append(pytest.param(family_name, strategy, extra, id=case_id, marks=marks))
    return params


@pytest.mark.parametrize("family_name, strategy, extra", _strategy_matrix())
def test_exactly_the_intended_parameters_change(
    tiny_models, chartqa_dir, tmp_path, unused_in_forward, family_name, strategy, extra
):
    family = FAMILIES[family_name]
    flags = dict(zip(extra[::2], extra[1::2]))
    rates = {
        key: value
        for key, value in RATES.items()
        if key == "learning_rate"
        or strategy in ("lora_llm_full_vit", "partial_llm_full_vit", "full")
        or (key == "learning_rate_llm" and strategy in ("qlora", "lora"))
        or (key == "learning_rate_vit" and (strategy == "vit_only" or "--vision_lora_r" in flags))
        or (
            key == "learning_rate_projector"
            and (strategy in ("vit_only", "projector_only") or "--train_projector" in flags)
        )
    }
    rate_args = [item for key, value in rates.items() for item in (f"--{key}", value)]
    if strategy == "qlora":
        rate_args += ["--bf16", "true", "--dtype", "bfloat16"]  # 4-bit compute in bf16, as the recipes run it
    trainer = build(
        tiny_models(family_name), chartqa_dir, tmp_path / "out", "--tuning_strategy", strategy, *extra, *rate_args
    )
    # Two steps: LoRA's A matrices only get a gradient once B has left zero.
    steps = train_and_snapshot(trainer)
    before, after = steps[0], steps[2]

    intended = {
        name
        for name in before
        if should_train(
            name,
            strategy,
            family,
            frozen_layers=int(flags.get("--llm_frozen_layers", 0)),
            vision_lora="--vision_lora_r" in flags,
            train_projector="--train_projector" in flags,
        )
    }
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed <= intended, f"changed but should be frozen: {sorted(changed - intended)[:8]}"
    unchanged = {
        name for name in intended - changed if not on_unused_module(name, family, unused_in_forward(family_name))
    }
    assert unchanged == set(), f"should train but did not change: {sorted(unchanged)[:8]}"
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == intended

    for group in trainer.optimizer.param_groups:
        expected = rates.get(
            f"learning_rate_{dict(vision_tower='vit', projector='projector').get(group['part'], 'llm')}", 1e-3
        )
        assert group["lr"] == pytest.approx(expected), group["part"]
    assert_weight_decay_by_kind(trainer)


def assert_weight_decay_by_kind(trainer, weight_decay=0.1):
    """Both ways: no LoRA, bias, norm or embedding parameter sits in a decaying group, and every other trained weight
    does decay; every trained parameter is in exactly one optimizer group."""
    modules = dict(trainer.model.named_modules())
    trained = {name for name, p in trainer.model.named_parameters() if p.requires_grad}

    def exempt(name):
        module = modules[name.rsplit(".", 1)[0]]
        is_norm = "Norm" in type(module).__name__
        return "lora_" in name or "bias" in name or is_norm or isinstance(module, torch.nn.Embedding)

    grouped = [name for group in trainer.optimizer.param_groups for name in group["names"]]
    assert sorted(grouped) == sorted(trained)
    decayed_exempt, undecayed_weights = [], []
    for group in trainer.optimizer.param_groups:
        assert group["weight_decay"] in (0.0, weight_decay)
        for name in group["names"]:
            if group["weight_decay"] and exempt(name):
                decayed_exempt.append(name)
            elif not group["weight_decay"] and not exempt(name):
                undecayed_weights.append(name)
    assert decayed_exempt == [], f"LoRA/bias/norm/embedding parameters with weight decay: {decayed_exempt[:8]}"
    assert undecayed_weights == [], f"weights without weight decay: {undecayed_weights[:8]}"


def test_staged_unfreezing_keeps_the_vision_tower_unchanged_until_its_step(tiny_qwen, chartqa_dir, tmp_path):
    trainer = build(
        tiny_qwen,
        chartqa_dir,
        tmp_path / "o",
        "--tuning_strategy",
        "full",
        "--vit_unfreeze_ratio",
        "0.5",
        "--max_steps",
        "4",
    )
    family = FAMILIES["qwen2_5_vl"]
    vision = [name for name, _ in trainer.model.named_parameters() if family.part_of(name) == "vision_tower"]
    llm = [name for name, _ in trainer.model.named_parameters() if ".layers." in name and "language_model" in name]
    steps = train_and_snapshot(trainer)
    # The first half (steps 1 and 2 of 4): the vision tower stays as it was while the language model learns.
    assert all(torch.equal(steps[0][name], steps[2][name]) for name in vision)
    assert all(not torch.equal(steps[0][name], steps[2][name]) for name in llm)
    assert all(not torch.equal(steps[2][name], steps[3][name]) for name in vision)


def test_full_parts_trained_next_to_lora_are_saved_with_the_adapter(tiny_qwen, chartqa_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    trainer = build(tiny_qwen, chartqa_dir, tmp_path / "o", "--tuning_strategy", "lora", "--train_projector", "true")
    trainer.train()
    trainer.model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_qwen), tmp_path / "adapter")
    trained = dict(trainer.model.named_parameters())
    for name, parameter in reloaded.named_parameters():
        if "modules_to_save" in name and "merger" in name:
            assert torch.equal(parameter, trained[name].detach())


@pytest.fixture
def config_only_model(tiny_qwen, tmp_path):
    """The tiny model's folder without its weights: a check that passes must happen before any weights load."""
    folder = tmp_path / "no_weights"
    shutil.copytree(tiny_qwen, folder)
    (folder / "model.safetensors").unlink()
    return folder


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--tuning_strategy", "partial_llm_full_vit", "--llm_frozen_layers", "5"],
            "llm_frozen_layers is 5, but qwen2_5_vl has 2",
        ),
        (
            ["--tuning_strategy", "lora", "--learning_rate_vit", "1e-4"],
            "`learning_rate_vit` is set, but tuning_strategy 'lora' keeps the vision tower frozen",
        ),
        (["--tuning_strategy", "vit_only", "--learning_rate_llm", "1e-4"], "keeps the language model frozen"),
        (
            ["--tuning_strategy", "lora", "--load_in_4bit", "true"],
            "tuning_strategy 'lora' means `load_in_4bit: false`",
        ),
        (["--tuning_strategy", "full", "--vision_lora_r", "4"], "`vision_lora_r` adds LoRA to a frozen vision tower"),
        (["--tuning_strategy", "lora", "--vit_unfreeze_ratio", "0.3"], "keeps it frozen"),
    ],
)
def test_bad_strategy_settings_fail_before_any_weights_load(config_only_model, chartqa_dir, tmp_path, extra, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        build(config_only_model, chartqa_dir, tmp_path / "o", *extra)
    assert not (tmp_path / "o" / "data_report.json").exists()  # before any data work too


def test_sft_refuses_too_many_frozen_layers_before_any_data_work(tiny_qwen, chartqa_dir, tmp_path, capsys):
    """Through the entry point: the clear message, and the output folder left without a data report."""
    output_dir = tmp_path / "out"
    result = run_in_process(
        "vlm_recipes.sft",
        REPO_ROOT / "recipes" / "demo" / "sft_lora.yaml",
        "--model_name_or_path", tiny_qwen, "--dataset_name", chartqa_dir, "--output_dir", output_dir,
        "--tuning_strategy", "partial_llm_full_vit", "--llm_frozen_layers", "5", capsys=capsys,
    )  # fmt: skip
    assert_clear_error(result, "llm_frozen_layers is 5, but qwen2_5_vl has 2 language-model layers")
    assert not (output_dir / "data_report.json").exists()


def test_unknown_strategy_in_a_recipe_file_is_named(config_only_model, chartqa_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("tuning_strategy: qlora_plus\n")
    expected = f"r.yaml: field 'tuning_strategy' is 'qlora_plus', which is not one of {', '.join(STRATEGIES)}."
    with pytest.raises(RecipeError, match=re.escape(expected)):
        trainer_recipe = parse_recipe(
            SFTRecipe,
            [
                str(recipe),
                "--model_name_or_path",
                str(config_only_model),
                "--dataset_name",
                str(chartqa_dir),
                "--output_dir",
                str(tmp_path / "o"),
            ],
        )
        build_trainer(trainer_recipe)


# ---------------------------------------------------------------------------------------------------------------------
# LoRA targets


def lora_ranks(peft_model, family):
    """Canonical name of each module LoRA wraps -> its rank."""
    return {
        family.canonical_name(name): module.r["default"]
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and "default" in getattr(module, "r", {})
    }


@pytest.mark.parametrize(
    "targets",
    [["q_proj", "v_proj"], [r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)"]],
    ids=["module-names", "one-regex"],
)
def test_vision_lora_with_chosen_target_modules(tiny_qwen, targets):
    """`lora_target_modules` as the command line gives it (a list; TRL turns a one-item list into its one regex)."""
    family = FAMILIES["qwen2_5_vl"]
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen)
    vision_linear = {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and family.part_of(name) == "vision_tower"
    }
    model_args = ModelArguments(
        model_name_or_path=str(tiny_qwen), lora_target_modules=targets, lora_r=8, lora_dropout=0.0
    )
    tuning = TuningArguments(tuning_strategy="lora", vision_lora_r=4)
    plan = resolve_strategy(tuning, model_args, model.config, family, 1e-4)
    ranks = lora_ranks(apply_strategy(model, plan, model_args, family), family)

    num_layers = model.config.get_text_config().num_hidden_layers
    llm = {
        f"{family.language_model_layers}.{i}.self_attn.{p}" for i in range(num_layers) for p in ("q_proj", "v_proj")
    }
    assert set(ranks) == llm | vision_linear
    assert {ranks[name] for name in llm} == {8} and {ranks[name] for name in vision_linear} == {4}


def test_vision_lora_with_target_modules_matching_nothing_is_refused(tiny_qwen):
    family = FAMILIES["qwen2_5_vl"]
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen)
    model_args = ModelArguments(model_name_or_path=str(tiny_qwen), lora_target_modules=["q_prj"], lora_dropout=0.0)
    plan = resolve_strategy(
        TuningArguments(tuning_strategy="lora", vision_lora_r=4), model_args, model.config, family, 1
    )
    with pytest.raises(RecipeError, match="`lora_target_modules` 'q_prj' names no module of the model"):
        apply_strategy(model, plan, model_args, family)


def test_lora_on_gemma4_moe_reaches_every_expert(tiny_models, chartqa_dir, tmp_path):
    """Gemma 4's mixture-of-experts checkpoints (26B-A4B; the gemma4 row): LoRA on the fused experts of every layer
    (peft target_parameters) besides the projections; the router and the experts' own weights stay frozen."""
    family = FAMILIES["gemma4"]
    trainer = build(tiny_models("gemma4_moe"), chartqa_dir, tmp_path / "o", "--tuning_strategy", "lora")
    layers = range(trainer.model.config.get_text_config().num_hidden_layers)
    adapted = set(lora_ranks(trainer.model, family))
    for layer in layers:
        prefix = f"{family.language_model_layers}.{layer}."
        assert {f"{prefix}experts", f"{prefix}self_attn.q_proj", f"{prefix}mlp.down_proj"} <= adapted
    assert not any("router" in name for name in adapted)

    steps = train_and_snapshot(trainer)
    changed = {name for name in steps[0] if not torch.equal(steps[0][name], steps[2][name])}
    assert changed and all("lora_" in name for name in changed)
    changed_experts = {layer_of(family.canonical_name(n), family) for n in changed if ".experts." in n}
    assert changed_experts == set(layers)
