"""KTO: unpaired rows (a user's rows with a boolean label, or preference pairs split into a desirable and an
undesirable row), recipes that cannot work, and one short run through the real entry point."""

import json
import math

import pytest
from conftest import REPO_ROOT, assert_ok, console_log_lines, run_in_process, shown_keys
from PIL import Image

from vlm_recipes.configs import DataArguments
from vlm_recipes.data.loading import load_datasets
from vlm_recipes.data.unpaired import label_counts, unpair
from vlm_recipes.hub.card import model_card
from vlm_recipes.kto import main
from vlm_recipes.run_folder import SavedRun


DEMO_RECIPE = REPO_ROOT / "recipes" / "demo" / "kto_lora.yaml"


@pytest.fixture(scope="module")
def preference_dir(tmp_path_factory):
    from vlm_recipes.data.synthetic import save_generated_dataset

    return save_generated_dataset(tmp_path_factory.mktemp("rlaif"), "rlaif_v", train_rows=16, test_rows=4, seed=0)


def text_of(turns):
    return " ".join(block["text"] for turn in turns for block in turn["content"] if block["type"] == "text")


def test_each_pair_becomes_one_desirable_and_one_undesirable_row(preference_dir):
    pairs, _, _ = load_datasets(DataArguments(dataset_name=str(preference_dir), formatter="rlaif_v"), task="unpaired")
    rows = unpair(pairs, seed=0)
    assert len(rows) == 2 * len(pairs) and label_counts(rows) == (len(pairs), len(pairs))
    by_prompt = {}  # (question, image) -> the rows made from that pair
    for row in rows:
        by_prompt.setdefault((text_of(row["prompt"]), row["images"][0].tobytes()), []).append(row)
    for pair in pairs:
        halves = by_prompt[(text_of(pair["prompt"]), pair["images"][0].tobytes())]
        answers = {text_of(row["completion"]): row["label"] for row in halves}
        assert answers[text_of(pair["chosen"])] is True and answers[text_of(pair["rejected"])] is False
    # Shuffled with the seed (TRL's KL estimate pairs neighbours: a pair's halves must not always sit together)
    labels = rows["label"]
    assert labels != [True, False] * len(pairs)
    assert unpair(pairs, seed=0)["label"] == labels and unpair(pairs, seed=1)["label"] != labels


def write_unpaired(tmp_path, labels):
    Image.new("RGB", (32, 32), "white").save(tmp_path / "a.png")
    rows = [
        {"prompt": "<image>How many bars?", "completion": str(index), "label": label, "images": ["a.png"]}
        for index, label in enumerate(labels)
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def test_a_users_rows_keep_their_boolean_label_and_bad_labels_are_named(tmp_path):
    path = write_unpaired(tmp_path, [True, False, "desirable", 0, "maybe", 2])
    rows, _, report = load_datasets(DataArguments(dataset_name=str(path), formatter="unpaired"), task="unpaired")
    assert rows["label"] == [True, False, True, False]
    assert unpair(rows, seed=0) is rows  # already unpaired: untouched
    rejected = report.to_dict()["train"]["rejected_by_reason"]["'label' is not a boolean"]
    assert rejected["count"] == 2 and "column 'label'" in rejected["first_message"]
    assert "rows.jsonl, line 5" in rejected["first_message"]


# ---------------------------------------------------------------------------------------------------------------------
# Recipes that cannot work fail before any weights load, with one message


def kto_args(model, data, output_dir, *extra):
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
        (["--train_sampling_strategy", "random"], "set `train_sampling_strategy: sequential`"),
        (["--per_device_train_batch_size", "1"], "`per_device_train_batch_size` to 2 or more"),
        (["--precompute_ref_log_probs", "true"], "`precompute_ref_log_probs` is not available for vision data"),
        (["--reference", "sft_merged"], "set `sft_adapter_path` too"),
    ],
)  # fmt: skip
def test_recipes_that_cannot_work_are_explained(capsys, tiny_qwen, preference_dir, tmp_path, extra, fragment):
    with pytest.raises(SystemExit) as info:
        main(kto_args(tiny_qwen, preference_dir, tmp_path / "o", *extra))
    assert info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_rows_of_one_label_only_are_refused(capsys, tiny_qwen, tmp_path):
    path = write_unpaired(tmp_path, [True] * 4)
    with pytest.raises(SystemExit) as info:
        main(kto_args(tiny_qwen, path, tmp_path / "o", "--formatter", "unpaired", "--dataset_test_split", "none"))
    assert info.value.code == 2
    assert "needs desirable and undesirable answers" in capsys.readouterr().err


def test_preflight_checks_a_kto_recipe(capsys, tiny_qwen, preference_dir, tmp_path):
    from vlm_recipes import preflight

    report_file = tmp_path / "preflight.json"
    preflight.main(kto_args(tiny_qwen, preference_dir, tmp_path / "o", "--preflight_report", report_file))
    console = capsys.readouterr().out
    assert "unpaired, " in console and "Peak GPU memory per device" in console
    assert "KTO: the KL batch runs without a graph" in console
    assert "reference: the policy with its adapter disabled" in console and "Preflight passed" in console
    report = json.loads(report_file.read_text())
    assert report["task"] == "unpaired" and report["memory_estimate_bytes"]["reference_weights"] == 0
    assert report["lengths"]["train"]["tokens"]["max"] > 0


# ---------------------------------------------------------------------------------------------------------------------
# End to end, through the real entry point


@pytest.fixture(scope="module")
def kto_run(tiny_qwen, preference_dir, tmp_path_factory):
    """One short KTO run through `main` in process, as `python -m vlm_recipes.kto` runs it (no second import of torch
    and TRL, ~35 s CPU): (its output folder, its console)."""
    output_dir = tmp_path_factory.mktemp("kto") / "run"
    result = run_in_process(
        "vlm_recipes.kto",
        *kto_args(tiny_qwen, preference_dir, output_dir),
        "--max_steps", "2", "--logging_steps", "1", "--max_train_samples", "4", "--dataset_test_split", "none",
    )  # fmt: skip
    assert_ok(result)
    return output_dir, result.stdout + result.stderr


def test_kto_run_on_split_pairs_logs_implied_rewards_and_saves_an_adapter(kto_run):
    output_dir, console = kto_run
    assert "KTO rows: 4 desirable, 4 undesirable" in console
    lines = console_log_lines(console)  # KTO's headline keys
    assert [shown_keys(line) for line in lines] == [["loss", "rewards/margins", "kl", "learning_rate"]] * 2
    log = [entry for entry in json.loads((output_dir / "training_log.json").read_text()) if "loss" in entry]
    assert len(log) == 2
    for entry in log:
        assert all(math.isfinite(entry[key]) for key in ("loss", "kl", "rewards/margins"))
    for name in ("adapter_model.safetensors", "adapter_config.json", "training_plot.png", "README.md"):
        assert (output_dir / name).is_file(), name
    card = model_card(SavedRun.read(output_dir), "me/kto", None)  # what a push writes
    assert "Kahneman-Tversky optimization" in card and "- rewards/margins: " in card and "- kl: " in card


def test_evaluate_takes_the_kto_runs_own_recipe(capsys, kto_run, chartqa_dir):
    # The run's model and adapter; KTO's own fields skipped. Its preference data is no evaluation task: the set to
    # score on is named, as for any recipe whose data has no task.
    from vlm_recipes.evaluate import main as evaluate

    output_dir, _ = kto_run
    eval_set = {"name": "charts", "dataset": str(chartqa_dir), "task": "chartqa", "split": "test", "max_samples": 2}
    results = evaluate([
        str(output_dir / "recipe.yaml"), "--adapter", str(output_dir), "--task", "chartqa",
        "--eval_datasets", json.dumps(eval_set), "--max_new_tokens", "2", "--evaluate_base", "false",
    ])  # fmt: skip
    skipped = capsys.readouterr().out.split("its method's own fields are not used here: ")[1].splitlines()[0]
    assert "beta" in skipped.split(", ")
    assert "dataset_name" not in skipped and "model_name_or_path" not in skipped
    assert 0 <= results["eval_sets"]["charts"]["results"]["adapter"]["relaxed_accuracy"] <= 1
