"""GRPO: the rewards are the task's own metrics verdict for verdict, the answer-format reward, the prompt length check
(prompt + completion within max_length, counted as the trainer renders the prompt), recipes that cannot work, and one
short run through the real entry point."""

import json
import math

import pytest
from conftest import REPO_ROOT, assert_ok, console_log_lines, run_in_process, shown_keys
from test_task_metrics import (
    DERIVED_LABELS,
    _is_float,
    number_variants,
    published_relaxed_correctness,
    text_variants,
)

from vlm_recipes.grpo import main
from vlm_recipes.hub.card import model_card
from vlm_recipes.run_folder import SavedRun
from vlm_recipes.tasks import get_task
from vlm_recipes.tasks.rewards import FORMAT_REWARD, MetricReward, has_answer_form, reward_functions


CHARTQA = get_task("chartqa")
DEMO_RECIPE = REPO_ROOT / "recipes" / "demo" / "grpo_lora.yaml"


def assistant(text):
    """One completion as TRL hands conversational completions to a reward."""
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def chartqa_pairs(chartqa_human_rows):
    """(label, prediction) pairs from the real ChartQA test labels and the answer shapes models produce."""
    pairs = []
    for label in [row["label"] for row in chartqa_human_rows] + DERIVED_LABELS:
        numeric = published_relaxed_correctness(label, label) and _is_float(label.rstrip("%"))
        variants = number_variants(label.rstrip("%").replace(",", "")) if numeric else text_variants(label)
        pairs += [(label, prediction) for prediction in dict.fromkeys(variants + text_variants(label))]
    return pairs


# ---------------------------------------------------------------------------------------------------------------------
# Rewards


def test_the_accuracy_reward_is_the_published_metric_verdict_for_verdict(chartqa_pairs):
    prompts = [[{"role": "user", "content": [{"type": "text", "text": "Value?"}]}]] * len(chartqa_pairs)
    rewards = MetricReward(CHARTQA, "relaxed_accuracy")(
        prompts=prompts,
        completions=[assistant(prediction) for _, prediction in chartqa_pairs],
        answers=[["not this one", label] for label, _ in chartqa_pairs],
        question=["Value?"] * len(chartqa_pairs),
        trainer_state=object(),  # what TRL adds to the call is not a row column
        completion_ids=[[0]] * len(chartqa_pairs),
    )
    expected = [float(published_relaxed_correctness(label, p.strip())) for label, p in chartqa_pairs]
    assert rewards == expected
    assert 0.2 < sum(rewards) / len(rewards) < 0.8  # both verdicts, often
    # The same numbers `evaluate` computes for these answers
    evaluated = [
        CHARTQA.score(p, {"answers": ["not this one", label]}).values["relaxed_accuracy"] for label, p in chartqa_pairs
    ]
    assert rewards == evaluated


@pytest.mark.parametrize("metric", ["relaxed_accuracy_normalized", "exact_match"])
def test_every_chartqa_metric_can_be_a_reward(chartqa_pairs, metric):
    completions = [prediction for _, prediction in chartqa_pairs]  # plain-text completions too
    rewards = MetricReward(CHARTQA, metric)(
        prompts=["Value?"] * len(chartqa_pairs),
        completions=completions,
        answers=[[label] for label, _ in chartqa_pairs],
    )
    assert rewards == [CHARTQA.score(p, {"answers": [label]}).values[metric] for label, p in chartqa_pairs]
    assert 0 < sum(rewards) < len(rewards)


@pytest.mark.parametrize(
    "task, answer, options, form",
    [
        ("chartqa", "42", None, True),
        ("chartqa", " 12.5% ", None, True),
        ("chartqa", "the green line in 2019", None, True),  # five words
        ("chartqa", "the value of the green line", None, False),  # six
        ("chartqa", "42\n43", None, False),
        ("chartqa", "", None, False),
        ("chartqa", "4\x002", None, False),
        ("chartqa", "4\ufffd", None, False),  # an incomplete UTF-8 sequence, decoded
        ("multiple_choice", "B", ["x", "y"], True),
        ("multiple_choice", "(B)", ["x", "y"], True),
        ("multiple_choice", "C", ["x", "y"], False),  # not one of the row's options
        ("multiple_choice", "B because", ["x", "y"], False),
        ("conversation", "A long answer\nover two lines.", None, True),
    ],
)  # fmt: skip
def test_answer_format(task, answer, options, form):
    assert has_answer_form(task, answer, {"options": options}) is form


def test_the_format_reward_scores_each_completion():
    (accuracy, answer_format) = reward_functions(CHARTQA, ["relaxed_accuracy", FORMAT_REWARD])
    assert (accuracy.__name__, answer_format.__name__) == ("relaxed_accuracy", "answer_format")  # TRL's log names
    completions = [assistant("7"), assistant("seven is the number I see here"), assistant("")]
    assert answer_format(prompts=["q"] * 3, completions=completions, answers=[["7"]] * 3) == [1.0, 0.0, 0.0]
    assert accuracy(prompts=["q"] * 3, completions=completions, answers=[["7"]] * 3) == [1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "task, names, fragment",
    [
        ("chartqa", ["anls"], "'anls' is not a reward of task 'chartqa'"),
        ("multiple_choice", ["unparsed"], "lower is better"),
        ("chartqa", ["relaxed_accuracy", "relaxed_accuracy"], "names a reward twice"),
    ],
)
def test_rewards_that_are_not_the_tasks_are_refused(task, names, fragment):
    from vlm_recipes.errors import RecipeError

    with pytest.raises(RecipeError, match=fragment.replace("(", r"\(")):
        reward_functions(get_task(task), names)


# ---------------------------------------------------------------------------------------------------------------------
# Length check: each prompt, as the trainer renders it, plus max_completion_length within max_length


def test_prompt_lengths_are_counted_as_the_trainer_renders_them(tiny_qwen, chartqa_dir):
    from transformers import AutoProcessor

    from vlm_recipes.configs import DataArguments, ReliabilityArguments
    from vlm_recipes.data.checks import check_training_data
    from vlm_recipes.data.lengths import TokenCounter
    from vlm_recipes.data.loading import load_datasets

    processor = AutoProcessor.from_pretrained(tiny_qwen)
    train, _, report = load_datasets(DataArguments(dataset_name=str(chartqa_dir), formatter="chartqa"), task="prompt")
    train = train.select(range(8))
    counter = TokenCounter(processor)
    lengths = [counter.count_row(row).total for row in train]
    # What TRL's GRPOTrainer tokenizes before generating (`_tokenize_prompts`): the prompt and the generation prompt
    for row, length in zip(train, lengths, strict=True):
        prompt = [
            {
                **m,
                "content": [
                    {"type": "image", "image": row["images"][0]} if b["type"] == "image" else b for b in m["content"]
                ],
            }
            for m in row["prompt"]
        ]
        rendered = processor.apply_chat_template([prompt], add_generation_prompt=True, tokenize=True, return_dict=True)
        assert len(rendered["input_ids"][0]) == length

    completion, longest = 16, max(lengths)
    kept, _ = check_training_data(
        train, None, report, processor, ReliabilityArguments(), longest + completion, reserved_tokens=completion
    )
    assert len(kept) == len(train)
    one_less, _ = check_training_data(
        train, None, report, processor, ReliabilityArguments(), longest + completion - 1, reserved_tokens=completion
    )
    assert len(one_less) == len(train) - lengths.count(longest)
    reasons = report.to_dict()["train"]["rejected_by_reason"]
    assert reasons["longer than max_length"]["count"] == lengths.count(longest)


# ---------------------------------------------------------------------------------------------------------------------
# Recipes that cannot work fail before any weights load, with one message


def grpo_args(model, data, output_dir, *extra):
    return [
        str(value)
        for value in (
            DEMO_RECIPE, "--model_name_or_path", model, "--dataset_name", data, "--output_dir", output_dir,
            "--overwrite_output_dir", "false", *extra,
        )
    ]  # fmt: skip


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--reward_weights", "1.0"], "`reward_weights` has 1 weight(s) for 2 reward(s)"),
        (["--reward_functions", "anls"], "'anls' is not a reward of task 'chartqa'"),
        (["--max_length", "64", "--max_completion_length", "64"], "leaves no room for a prompt within `max_length`"),
        (["--use_vllm", "true"], "`use_vllm: true` needs"),
        (["--reference", "sft_merged"], "set `sft_adapter_path` too"),
        (["--max_length", "40"], "longer than max_length"),  # every prompt is: the run stops before the weights load
    ],
)  # fmt: skip
def test_recipes_that_cannot_work_are_explained(capsys, tiny_qwen, chartqa_dir, tmp_path, extra, fragment):
    with pytest.raises(SystemExit) as info:
        main(grpo_args(tiny_qwen, chartqa_dir, tmp_path / "o", *extra))
    assert info.value.code == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()


def test_vllm_settings_pass_through_to_trl_and_are_checked(monkeypatch, tiny_qwen, chartqa_dir, tmp_path):
    import importlib.util

    import torch

    from vlm_recipes.errors import RecipeError
    from vlm_recipes.grpo import GRPORecipe, check_generation_backend
    from vlm_recipes.recipe import parse_recipe

    def recipe(*extra):
        return parse_recipe(
            GRPORecipe, grpo_args(tiny_qwen, chartqa_dir, tmp_path / "o", "--use_vllm", "true", *extra)
        )

    shared = recipe("--vllm_gpu_memory_utilization", "0.45", "--vllm_tensor_parallel_size", "2")
    whole_gpu = recipe("--vllm_gpu_memory_utilization", "1.5")
    with pytest.raises(RecipeError, match="needs vLLM, which is not installed"):  # this machine: no vLLM, no GPU
        check_generation_backend(shared.training)
    # Where vLLM and a GPU are there, the recipe's settings reach TRL's config unchanged (colocate: TRL's default)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else find_spec(name, *a)
    )
    with pytest.raises(RecipeError, match="needs a CUDA GPU"):
        check_generation_backend(shared.training)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_generation_backend(shared.training)
    assert shared.training.vllm_mode == "colocate"
    assert (shared.training.vllm_gpu_memory_utilization, shared.training.vllm_tensor_parallel_size) == (0.45, 2)
    with pytest.raises(RecipeError, match="give it a share between 0 and 1"):
        check_generation_backend(whole_gpu.training)


# ---------------------------------------------------------------------------------------------------------------------
# End to end, through the real entry point: a few steps on the tiny model with the KL term (the reference pass)


@pytest.fixture(scope="module")
def grpo_run(tiny_qwen, chartqa_dir, tmp_path_factory):
    """One short GRPO run (2 steps, the KL term on) through `main` in process, as `python -m vlm_recipes.grpo` runs it
    (no second import of torch and TRL, ~35 s CPU): (its output folder, its console)."""
    output_dir = tmp_path_factory.mktemp("grpo") / "run"
    result = run_in_process(
        "vlm_recipes.grpo",
        *grpo_args(tiny_qwen, chartqa_dir, output_dir),
        "--max_steps", "2", "--num_generations", "4", "--per_device_train_batch_size", "4",
        "--max_completion_length", "3", "--max_train_samples", "8", "--beta", "0.04", "--dataset_test_split", "none",
    )  # fmt: skip
    assert_ok(result)
    return output_dir, result.stdout + result.stderr


def test_grpo_run_logs_each_reward_and_saves_an_adapter(grpo_run):
    output_dir, console = grpo_run
    assert "GRPO rewards (chartqa): relaxed_accuracy x 1, answer_format x 1; 4 generations per prompt" in console
    assert "reward: " in console and " at step 1 -> " in console  # the mean reward at the start and the end
    lines = console_log_lines(console)  # GRPO's headline keys, the KL term on
    assert [shown_keys(line) for line in lines] == [
        ["reward", "reward_std", "kl", "completions/mean_length", "learning_rate"]
    ] * 2
    log = [entry for entry in json.loads((output_dir / "training_log.json").read_text()) if "reward" in entry]
    assert len(log) == 2
    for entry in log:
        accuracy, answer_form = entry["rewards/relaxed_accuracy/mean"], entry["rewards/answer_format/mean"]
        assert 0 <= accuracy <= 1 and 0 <= answer_form <= 1
        assert entry["reward"] == pytest.approx(accuracy + answer_form)  # weighted 1 and 1
        assert 1 <= entry["completions/mean_length"] <= 3
        assert math.isfinite(entry["kl"]) and entry["kl"] >= 0 and math.isfinite(entry["loss"])
    for name in ("adapter_model.safetensors", "adapter_config.json", "training_plot.png", "recipe.yaml", "README.md"):
        assert (output_dir / name).is_file(), name
    card = model_card(SavedRun.read(output_dir), "me/grpo", None)  # what a push writes
    assert "group relative policy optimization" in card
    for key in ("reward", "rewards/relaxed_accuracy/mean", "rewards/answer_format/mean", "reward_std", "kl"):
        assert f"- {key}: " in card and " at step 1 -> " in card, key


def test_evaluate_takes_the_grpo_runs_own_recipe(capsys, grpo_run):
    # `vlm-recipes evaluate RUN/recipe.yaml --adapter RUN`: the run's data, model and task; its rewards, generation
    # and KL settings are named once and skipped
    from vlm_recipes.evaluate import main as evaluate

    output_dir, _ = grpo_run
    results = evaluate([
        str(output_dir / "recipe.yaml"), "--adapter", str(output_dir), "--dataset_test_split", "test",
        "--max_eval_samples", "2", "--max_new_tokens", "2", "--evaluate_base", "false",
    ])  # fmt: skip
    console = capsys.readouterr().out
    skipped = console[console.index("its method's own fields are not used here: ") :].splitlines()[0]
    for name in ("reward_functions", "reward_weights", "num_generations", "max_completion_length", "beta"):
        assert name in skipped, name
    for name in ("dataset_name", "model_name_or_path", "task", "max_length"):
        assert name not in skipped.split(": ", 1)[1].split(", "), name  # read, not skipped
    scores = results["eval_sets"]["chartqa"]["results"]["adapter"]
    assert results["adapter"] == str(output_dir) and 0 <= scores["relaxed_accuracy"] <= 1
    assert (output_dir / "eval_results.json").is_file()


def test_evaluate_still_refuses_a_field_no_entry_point_knows(capsys, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(DEMO_RECIPE.read_text() + "reward_function: [answer_format]\n")  # a typo of reward_functions
    from vlm_recipes.evaluate import main as evaluate

    with pytest.raises(SystemExit) as info:
        evaluate([str(recipe), "--output_dir", str(tmp_path / "o")])
    assert info.value.code == 2
    assert "unknown field 'reward_function'" in capsys.readouterr().err


def sft_adapter(model_dir, output_dir):
    """An SFT run's adapter as the package saves one (the strategy's LoRA targets), with non-zero weights: a fresh
    LoRA adapter's B matrices are zero, a trained one's are not."""
    import torch

    from vlm_recipes.configs import ModelArguments, TuningArguments
    from vlm_recipes.modeling.loading import load_for_training
    from vlm_recipes.modeling.setup import resolve_model_setup

    model_args = ModelArguments(model_name_or_path=str(model_dir), dtype="float32", lora_dropout=0.0, lora_r=8)
    model = load_for_training(resolve_model_setup(model_args, TuningArguments(tuning_strategy="lora"), 1e-4))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    model.save_pretrained(output_dir)
    return output_dir


@pytest.mark.extended  # a second GRPO run (4-bit, ~40 s on 2 CPU cores): the start adapter and 4 bit, end to end
def test_grpo_in_4bit_from_an_sft_adapter_trains_it_further(tiny_qwen, chartqa_dir, tmp_path, monkeypatch):
    import bitsandbytes.nn.modules as bnb_modules
    import torch
    from bitsandbytes.nn import Linear4bit
    from safetensors.torch import load_file

    from vlm_recipes.configs import ModelArguments
    from vlm_recipes.grpo import GRPORecipe, build_trainer, reward_keys
    from vlm_recipes.modeling.loading import load_for_inference
    from vlm_recipes.recipe import parse_recipe
    from vlm_recipes.training.run import train_and_save

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)  # as tests/test_four_bit_evaluation.py explains
    start = sft_adapter(tiny_qwen, tmp_path / "sft")
    start_weights = load_file(start / "adapter_model.safetensors")
    output_dir = tmp_path / "grpo"
    recipe = parse_recipe(GRPORecipe, grpo_args(
        tiny_qwen, chartqa_dir, output_dir, "--tuning_strategy", "qlora", "--sft_adapter_path", start,
        "--max_steps", "2", "--num_generations", "4", "--per_device_train_batch_size", "4",
        "--max_completion_length", "3", "--max_train_samples", "8", "--beta", "0.04", "--dataset_test_split", "none",
        "--learning_rate", "0.05",
    ))  # fmt: skip
    trainer = build_trainer(recipe)
    assert any(isinstance(module, Linear4bit) for module in trainer.model.modules())
    # Before training the policy is the SFT adapter (not a new adapter, whose B matrices are zero)
    policy = {
        name: parameter.detach().float()
        for name, parameter in trainer.model.named_parameters()
        if "lora_" in name and ".default." in name
    }
    assert len(policy) == len(start_weights) and any("lora_B" in name for name in policy)
    for name, weight in start_weights.items():
        loaded = policy[name.replace(".weight", ".default.weight")]
        # bf16's tolerance: the recipe's 16-bit dtype rounds the float32 SFT adapter as it loads (peft 0.21.2)
        torch.testing.assert_close(loaded, weight.float(), rtol=1.6e-2, atol=1e-5)
    assert recipe.policy.reference == "sft_adapter"  # the frozen copy of the SFT adapter is the reference

    train_and_save(trainer, recipe, summary_keys=("reward", *reward_keys(recipe.rewards.reward_functions)))
    log = [entry for entry in json.loads((output_dir / "training_log.json").read_text()) if "reward" in entry]
    assert len(log) == 2 and all(math.isfinite(entry["reward"]) and math.isfinite(entry["kl"]) for entry in log)
    trained = load_file(output_dir / "adapter_model.safetensors")
    assert trained.keys() == start_weights.keys()  # the SFT adapter trained further, no second adapter saved
    assert any(not torch.equal(trained[name], start_weights[name]) for name in trained)

    # The saved adapter loads back onto the 4-bit base, with the weights it was saved with
    model, _, _ = load_for_inference(
        ModelArguments(model_name_or_path=str(tiny_qwen), dtype="bfloat16", load_in_4bit=True), output_dir
    )
    assert any(isinstance(module, Linear4bit) for module in model.modules())
    reloaded = {name: p for name, p in model.named_parameters() if "lora_" in name}
    for name, weight in trained.items():
        torch.testing.assert_close(reloaded[name.replace(".weight", ".default.weight")].float().cpu(), weight.float())


# ---------------------------------------------------------------------------------------------------------------------
# Preflight: the same model, data and length checks as the run, and a memory estimate that counts the generations


def test_preflight_checks_a_grpo_recipe_and_counts_its_generations(capsys, tiny_qwen, chartqa_dir, tmp_path):
    from vlm_recipes import preflight

    report_file = tmp_path / "preflight.json"
    preflight.main(
        grpo_args(tiny_qwen, chartqa_dir, tmp_path / "o", "--max_train_samples", "8", "--beta", "0.04",
                  "--preflight_report", report_file)
    )  # fmt: skip
    console = capsys.readouterr().out
    assert "prompt, " in console and "max_length 1024, each prompt + 4 completion tokens" in console
    assert "generation: KV cache, logits" in console and "16 sequences at once" in console
    assert "GRPO: 2 prompt(s) x 8 generations per generation batch" in console
    assert "reference: the policy with its adapter disabled, no extra weights" in console
    assert "Preflight passed" in console and not (tmp_path / "o").exists()
    report = json.loads(report_file.read_text())
    memory = report["memory_estimate_bytes"]
    assert memory["generation"] > 0 and memory["generation_sequences"] == 16 and memory["reference_weights"] == 0
    assert report["data_report"]["train"]["rows"] == 8


def grpo_estimate(model, data, *extra):
    from vlm_recipes.grpo import GRPORecipe, apply_defaults
    from vlm_recipes.modeling.memory import estimate_peak_memory, method_load
    from vlm_recipes.recipe import parse_recipe
    from vlm_recipes.training.run import resolve_model

    recipe = parse_recipe(GRPORecipe, grpo_args(model, data, "unused", *extra))
    apply_defaults(recipe)
    setup = resolve_model(recipe)
    prompt, image = 300, 120  # tokens of the longest prompt, of its image
    method = method_load(recipe.training, setup.plan, recipe.policy, prompt)
    completion = recipe.training.max_completion_length
    return estimate_peak_memory(setup, recipe.training, prompt + completion, image, 1, recipe.speed, method)


def test_the_grpo_estimate_grows_with_the_generations_per_prompt(tiny_qwen, chartqa_dir):
    # Two prompts per batch at 2, 4 and 8 generations each: more sequences to generate and to train on
    estimates = [
        grpo_estimate(tiny_qwen, chartqa_dir, "--num_generations", n, "--per_device_train_batch_size", 2 * n)
        for n in (2, 4, 8)
    ]
    assert [e.generation_sequences for e in estimates] == [4, 8, 16]
    for smaller, larger in zip(estimates, estimates[1:]):
        assert larger.generation > smaller.generation and larger.peak(False) > smaller.peak(False)
    longer = grpo_estimate(tiny_qwen, chartqa_dir, "--max_completion_length", 64, "--max_length", 1024)
    assert longer.generation > grpo_estimate(tiny_qwen, chartqa_dir).generation  # the cache holds the completions
    # A full fine-tune with a KL term keeps a frozen copy of the model: its weights once more
    full = grpo_estimate(tiny_qwen, chartqa_dir, "--tuning_strategy", "full", "--beta", "0.04")
    assert full.reference_weights == full.weights
    assert grpo_estimate(tiny_qwen, chartqa_dir, "--tuning_strategy", "full").reference_weights == 0  # beta 0


# ---------------------------------------------------------------------------------------------------------------------
# Images once: a GRPO batch repeats each prompt's image per generation; the cache encodes each distinct image once


def test_image_feature_cache_encodes_each_image_once_with_the_same_logits(tiny_qwen):
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_recipes.training.image_features import ImageFeatureCache

    processor = AutoProcessor.from_pretrained(tiny_qwen)
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen, dtype=torch.float32).eval()
    charts = [Image.new("RGB", (56, 84), "white"), Image.new("RGB", (56, 84), "navy")]
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Value?"}]}]
    text = processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    # Two prompts, three generations each, as TRL lays out a generation batch
    batch = processor(text=[text] * 6, images=[[charts[0]]] * 3 + [[charts[1]]] * 3, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**batch).logits
        cache = ImageFeatureCache()
        with cache.serving(model):
            first = model(**batch).logits  # the generation's pass: two encodings
            again = model(**batch).logits  # the reference's and the policy's: none
    assert (cache.encoded, cache.served) == (2, 12)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(again, expected)
    assert "get_image_features" not in vars(model.model)  # the model's own method is back
    cache.clear()
    with torch.no_grad(), cache.serving(model):
        model(**batch)
    assert cache.encoded == 4  # a new generation batch encodes again
