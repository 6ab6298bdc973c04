"""The dataset registry, mixtures and held-out splits (`data.registry`, `data.mixture`, `data.loading`), and one SFT run
through the real entry point on a registry of two differently shaped sources mixed 3:1 and split 90/10."""

import csv
import json
import math

import pytest
import torch
import yaml
from conftest import REPO_ROOT, logged_losses

from vlm_recipes import preflight
from vlm_recipes.configs import DataArguments
from vlm_recipes.data.loading import load_datasets
from vlm_recipes.data.mixture import draw_mixture, held_out_indices
from vlm_recipes.data.registry import builtin_registry, load_registry
from vlm_recipes.errors import DataError, RecipeError
from vlm_recipes.recipe import parse_recipe
from vlm_recipes.sft import SFTRecipe, build_trainer, main
from vlm_recipes.tasks import TASKS
from vlm_recipes.training.source_loss import SOURCE_IDS


ROWS = 200  # per source; 180 train after the 90/10 split


def negative_binomial_bounds(successes: int, p: float, sigmas: float = 4.0) -> tuple[float, float]:
    """Rows of the other source drawn before the `successes`-th draw of a source drawn with probability p: mean
    r(1-p)/p, variance r(1-p)/p^2; `sigmas` standard deviations either side."""
    mean = successes * (1 - p) / p
    deviation = math.sqrt(successes * (1 - p)) / p
    return mean - sigmas * deviation, mean + sigmas * deviation


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """A registry of two differently shaped sources: a folder of chart images with a CSV of questions (file, prompt,
    reply), and JSONL conversations with their own keys and role names, an image column and a system column."""
    from vlm_recipes.data.synthetic import make_chartqa_rows

    root = tmp_path_factory.mktemp("mixture")
    (root / "images").mkdir()
    charts = make_chartqa_rows(8, seed=1)
    for index, chart in enumerate(charts):
        chart["image"].save(root / "images" / f"chart{index}.png")
    with open(root / "questions.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "prompt", "reply"])
        for index in range(ROWS):
            chart = charts[index % 8]
            writer.writerow([f"chart{index % 8}.png", chart["query"], chart["label"][0]])
    lines = []
    for index in range(ROWS):
        chart = charts[(index + 3) % 8]
        dialogue = [
            {"speaker": "human", "text": "<image>" + chart["query"]},
            {"speaker": "bot", "text": chart["label"][0]},
        ]
        lines.append(
            json.dumps({"picture": f"images/chart{(index + 3) % 8}.png", "note": "Be brief.", "dialogue": dialogue})
        )
    (root / "chats.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    registry = {
        "charts_csv": {
            "source": "questions.csv",
            "image_root": "images",
            "columns": {"image": "file", "question": "prompt", "answer": "reply"},
        },
        "chats": {
            "source": "chats.jsonl",
            "columns": {"image": "picture", "system": "note"},
            "messages": {
                "column": "dialogue",
                "role_key": "speaker",
                "content_key": "text",
                "roles": {"user": "human", "assistant": "bot"},
            },
        },
    }
    (root / "registry.yaml").write_text(yaml.safe_dump(registry), encoding="utf-8")
    return root


def mixture_args(root, **changes):
    values = {
        "dataset_registry": str(root / "registry.yaml"),
        "datasets": [{"name": "charts_csv", "weight": 3}, "chats"],
        "train_split_ratio": 0.9,
    }
    return DataArguments(**{**values, **changes})


def test_draw_follows_the_weights_within_sampling_error_and_repeats_with_the_seed():
    sizes, weights = [3000, 3000], [3.0, 1.0]
    order = draw_mixture(sizes, weights, seed=7)
    assert order == draw_mixture(sizes, weights, seed=7)
    assert order != draw_mixture(sizes, weights, seed=8)
    assert len(set(order)) == len(order)  # no row twice
    first = sum(1 for source, _ in order if source == 0)
    second = len(order) - first
    # The weight-3 source runs out first (all its rows taken); the other's count is negative binomial.
    assert first == 3000
    low, high = negative_binomial_bounds(3001, 0.75)
    assert low <= second <= high, (second, low, high)


def test_held_out_split_is_the_same_rows_every_run_and_disjoint():
    train, evaluation = held_out_indices(100, 0.1, seed=3, name="a")
    assert (train, evaluation) == held_out_indices(100, 0.1, seed=3, name="a")
    assert len(evaluation) == 10 and not set(train) & set(evaluation) and len(train) + len(evaluation) == 100
    assert evaluation != held_out_indices(100, 0.1, seed=3, name="b")[1]  # each source its own rows
    with pytest.raises(RecipeError, match="leaves no training"):
        held_out_indices(5, 5, seed=0)


def test_builtin_registry_covers_chartqa_rlaif_v_and_every_task_with_data():
    entries = builtin_registry()
    assert entries["chartqa"].source == "HuggingFaceM4/ChartQA" and entries["chartqa"].formatter == "chartqa"
    assert entries["rlaif_v"].source == "openbmb/RLAIF-V-Dataset" and entries["rlaif_v"].formatter == "rlaif_v"
    formatters = {entry.formatter for entry in entries.values()}
    # Every task reads its data with a registered dataset's formatter; `conversation` is the user's own data.
    assert {task.formatter for name, task in TASKS.items() if name != "conversation"} <= formatters
    for name in ("docvqa", "infovqa", "textvqa", "vqav2"):
        assert entries[name].test_split, name


def test_mixture_reads_both_shapes_and_reports_rows_per_source(two_sources):
    train, evaluation, report = load_datasets(mixture_args(two_sources), seed=1, need_eval=True)
    chat = next(row for row in train if row["data_source"] == "chats")
    assert [message["role"] for message in chat["messages"]] == ["system", "user", "assistant"]
    assert chat["messages"][0]["content"][0]["text"] == "Be brief."  # the row's system column
    assert chat["messages"][1]["content"][0]["type"] == "image"
    csv_row = next(row for row in train if row["data_source"] == "charts_csv")
    assert csv_row["images"][0].size[0] > 4 and csv_row["messages"][-1]["role"] == "assistant"
    details = report.to_dict()
    assert details["mixture"]["charts_csv"]["mixed_train_rows"] == 180  # the weight-3 source runs out first
    assert details["mixture"]["chats"]["mixed_train_rows"] == len(train) - 180
    assert details["held_out"]["chats"]["eval_rows"] == 20 and len(evaluation) == 40
    again = load_datasets(mixture_args(two_sources), seed=1, need_eval=True)[2].to_dict()
    assert again["held_out"] == details["held_out"] and again["mixture"] == details["mixture"]
    assert str(two_sources) not in json.dumps(details)  # no local path in what a push may upload


def test_max_samples_alone_joins_a_source_whole(two_sources):
    args = mixture_args(two_sources, datasets=["charts_csv", {"name": "chats", "max_samples": 25}])
    train, _, report = load_datasets(args, seed=1)
    assert report.mixture["chats"]["mixed_train_rows"] == 25 and report.mixture["chats"]["weight"] is None
    assert report.mixture["charts_csv"]["mixed_train_rows"] == 180 and len(train) == 205
    first = load_datasets(mixture_args(two_sources, **{**args.__dict__, "max_train_samples": 41}), seed=1)[0]
    assert 0 < first["data_source"].count("chats") < 25  # the whole source is spread through the order, not last


def test_a_bad_turn_is_skipped_and_counted_under_its_source(two_sources, tmp_path):
    lines = (two_sources / "chats.jsonl").read_text().splitlines()
    broken = json.loads(lines[4])
    broken["dialogue"][1]["speaker"] = "narrator"
    registry = yaml.safe_load((two_sources / "registry.yaml").read_text())
    (tmp_path / "chats.jsonl").write_text("\n".join([*lines[:4], json.dumps(broken), *lines[5:]]) + "\n")
    registry["chats"]["source"] = str(tmp_path / "chats.jsonl")
    registry["charts_csv"].update(source=str(two_sources / "questions.csv"), image_root=str(two_sources / "images"))
    (tmp_path / "images").symlink_to(two_sources / "images")
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump(registry))
    args = mixture_args(two_sources, dataset_registry=str(tmp_path / "registry.yaml"), train_split_ratio=None)
    _, _, report = load_datasets(args, seed=1)
    rejected = report.splits["train:chats"].rejections["unknown role"]
    assert rejected.count == 1 and rejected.examples == ["line 5"]
    assert "'narrator'" in rejected.message and "column 'dialogue'" in rejected.message

    (tmp_path / "chats.jsonl").write_text(json.dumps(broken) + "\n")
    with pytest.raises(DataError, match=r"'chats' has no usable training rows \(1 read; most common: unknown role"):
        load_datasets(args, seed=1)


@pytest.mark.parametrize(
    ("entry", "fragments"),
    [
        ({"source": "x.csv", "colums": {}}, ["entry 'mine'", "unknown field 'colums'", "columns"]),
        ({"source": "x.csv", "weight": -1}, ["entry 'mine'", "field 'weight'", "-1"]),
        ({"source": "x.csv", "columns": {"picture": "file"}}, ["entry 'mine'", "'picture'", "image"]),
        ({"source": "x.csv", "formatter": "nope"}, ["Unknown formatter 'nope'"]),
        ({"columns": {"image": "file"}}, ["entry 'mine'", "field 'source'"]),
        ({"source": "missing.csv"}, ["entry 'mine'", "missing.csv", "no such file", "registry's folder"]),
    ],
)
def test_a_wrong_registry_entry_is_one_line_naming_file_entry_and_field(tmp_path, entry, fragments):
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump({"mine": entry}))
    with pytest.raises(RecipeError) as raised:
        load_registry(str(path))
    message = str(raised.value)
    assert "\n" not in message and (str(path) in message or "Unknown formatter" in message)
    for fragment in fragments:
        assert fragment in message, message


def test_unknown_name_lists_the_registered_ones_and_eval_only_sets_are_refused(two_sources):
    with pytest.raises(RecipeError, match=r"no dataset 'chart_csv'.*Registered: .*chartqa, charts_csv, chats"):
        load_datasets(mixture_args(two_sources, datasets=["chart_csv"]))
    with pytest.raises(RecipeError, match="'docvqa' has no training split"):
        load_datasets(mixture_args(two_sources, datasets=["docvqa"]))
    with pytest.raises(RecipeError, match="both `dataset_name` and `datasets`"):
        load_datasets(mixture_args(two_sources, dataset_name="x.jsonl"))


def test_a_mapping_that_names_a_missing_column_says_so_before_formatting(two_sources, tmp_path):
    registry = yaml.safe_load((two_sources / "registry.yaml").read_text())
    registry["charts_csv"]["columns"]["answer"] = "response"
    registry["charts_csv"]["source"] = str(two_sources / "questions.csv")
    registry["charts_csv"]["image_root"] = str(two_sources / "images")
    registry["chats"]["source"] = str(two_sources / "chats.jsonl")
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump(registry))
    with pytest.raises(DataError, match=r"questions.csv, column 'response'.*charts_csv.*missing.*file, prompt, reply"):
        load_datasets(mixture_args(two_sources, dataset_registry=str(tmp_path / "registry.yaml")))


def test_csv_glob_and_parquet_sources_read(two_sources, tmp_path):
    from datasets import Dataset

    rows = list(csv.DictReader(open(two_sources / "questions.csv", encoding="utf-8")))
    Dataset.from_list(rows[:10]).to_parquet(str(tmp_path / "part-0.parquet"))
    Dataset.from_list(rows[10:30]).to_parquet(str(tmp_path / "part-1.parquet"))
    registry = {
        "parts": {
            "source": "part-*.parquet",
            "image_root": str(two_sources / "images"),
            "columns": {"image": "file", "question": "prompt", "answer": "reply"},
        }
    }
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump(registry))
    train, _, report = load_datasets(
        DataArguments(dataset_registry=str(tmp_path / "registry.yaml"), datasets=["parts"]), seed=0
    )
    assert len(train) == 30 and report.mixture["parts"]["formatted_rows"] == 30


@pytest.mark.e2e
def test_sft_trains_on_a_3_to_1_mixture_split_90_10(tiny_qwen, two_sources, tmp_path, capsys):
    recipe = yaml.safe_load((REPO_ROOT / "recipes" / "demo" / "sft_lora.yaml").read_text())
    for key in ("dataset_name", "formatter", "dataset_train_split", "dataset_test_split", "max_train_samples"):
        recipe.pop(key)
    recipe.update(
        model_name_or_path=str(tiny_qwen),
        dataset_registry=str(two_sources / "registry.yaml"),
        datasets=[{"name": "charts_csv", "weight": 3}, {"name": "chats", "weight": 1}],
        train_split_ratio=0.9,
        task="conversation",
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        logging_steps=1,
        train_sampling_strategy="sequential",  # the mixture's own order: length grouping would batch sources apart
    )
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    main([str(tmp_path / "recipe.yaml")])  # in process: the entry point's own code, without a second import of torch
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    mixture = report["mixture"]
    assert mixture["charts_csv"]["train_rows"] == 180  # every row of the weight-3 source, checked and kept
    low, high = negative_binomial_bounds(181, 0.75)
    assert low <= mixture["chats"]["train_rows"] <= high, mixture
    assert report["train"]["rows"] == mixture["charts_csv"]["train_rows"] + mixture["chats"]["train_rows"]
    assert {name: record["eval_rows"] for name, record in report["held_out"].items()} == {
        "charts_csv": 20,
        "chats": 20,
    }
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert len(logged_losses(tmp_path / "out")) == 2
    log = json.loads((tmp_path / "out" / "training_log.json").read_text())
    per_source = [{key for key in entry if key.startswith("loss/")} for entry in log if "loss" in entry]
    assert set().union(*per_source) == {"loss/charts_csv", "loss/chats"}, log  # each source's loss, beside the loss

    preflight.main([str(tmp_path / "recipe.yaml"), "--preflight_report", str(tmp_path / "preflight.json")])
    assert "Padding per source" in capsys.readouterr().out
    lengths = json.loads((tmp_path / "preflight.json").read_text())["lengths"]
    assert lengths["train:charts_csv"]["rows"] == 180
    assert lengths["train:charts_csv"]["rows"] + lengths["train:chats"]["rows"] == lengths["train"]["rows"]

    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**recipe, "datasets": ["charts_csv", "chat"]}))
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path / "bad.yaml"), "--output_dir", str(tmp_path / "out2")])
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert "no dataset 'chat'" in message and "Registered:" in message and "charts_csv" in message


def test_the_docs_registry_example_parses():
    from vlm_recipes.data.registry import _read_registry

    page = (REPO_ROOT / "docs" / "your-data.md").read_text(encoding="utf-8")
    block = page.split("# data/registry.yaml\n", 1)[1].split("```", 1)[0]
    entries = _read_registry(block, "docs/your-data.md", None)
    assert entries["my_charts"].formatter_name("chartqa") == "vqa"
    chats = entries["support_chats"]
    assert chats.formatter_name("chartqa") == "conversations" and chats.messages.roles["user"] == "customer"
    turns = chats.messages.turns('[{"speaker": "agent", "text": "Hi."}]', "dialogue")
    assert turns == [{"role": "assistant", "content": "Hi."}]


@pytest.fixture
def preference_registry(two_sources, tmp_path):
    """A registry of two differently shaped preference sources of 30 pairs each: a CSV and a JSONL file."""
    with open(tmp_path / "pairs.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["img", "q", "good", "bad"])
        writer.writerows([[f"chart{i % 8}.png", "What is shown?", "A chart.", "A cat."] for i in range(30)])
    pairs = [{"images": [str(two_sources / "images" / "chart1.png")], "prompt": "<image>Describe.", "chosen": "Bars.",
              "rejected": "Dogs."}] * 30  # fmt: skip
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    registry = {
        "pairs_csv": {
            "source": "pairs.csv",
            "image_root": str(two_sources / "images"),
            "columns": {"image": "img", "question": "q", "chosen": "good", "rejected": "bad"},
        },
        "pairs_jsonl": {"source": "pairs.jsonl", "formatter": "preference"},
    }
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump(registry))
    return tmp_path / "registry.yaml"


def test_preference_sources_of_two_shapes_mix_for_dpo(preference_registry):
    args = DataArguments(dataset_registry=str(preference_registry), datasets=["pairs_csv", "pairs_jsonl"])
    train, _, report = load_datasets(args, seed=0, task="preference")
    assert {"images", "prompt", "chosen", "rejected", "data_source"} <= set(train.column_names)
    assert report.mixture["pairs_csv"]["formatted_rows"] == report.mixture["pairs_jsonl"]["formatted_rows"] == 30
    row = next(row for row in train if row["data_source"] == "pairs_csv")
    assert row["prompt"][0]["content"][0]["type"] == "image" and row["chosen"][0]["content"][0]["text"] == "A chart."


def test_sft_loss_per_source_averages_to_the_loss_padded_and_packed(tiny_qwen, two_sources, tmp_path):
    """The per-source token losses of a batch, weighted by their tokens, are the batch's loss: from TRL's own
    per-token values, for padded rows and for the same rows packed into one sequence."""
    recipe = {
        "model_name_or_path": str(tiny_qwen),
        "dataset_registry": str(two_sources / "registry.yaml"),
        "datasets": [{"name": "charts_csv", "weight": 3}, "chats"],
        "max_train_samples": 16,
        "task": "conversation",
        "output_dir": str(tmp_path / "out"),
        "use_peft": True,
        "lora_dropout": 0.0,
        "use_cpu": True,
        "bf16": False,
        "dtype": "float32",
        "report_to": "none",
        "per_device_train_batch_size": 8,
        "train_sampling_strategy": "sequential",  # the mixture's order: length grouping would batch sources apart
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    trainer = build_trainer(parse_recipe(SFTRecipe, [str(tmp_path / "recipe.yaml")]))
    assert trainer.source_losses.names == ("charts_csv", "chats")
    batch = next(batch for batch in trainer.get_train_dataloader() if batch[SOURCE_IDS].unique().numel() == 2)
    batch = trainer._prepare_inputs(batch)
    trainer.model.train()
    for packs_rows in (False, True):
        trainer.packs_rows = packs_rows
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, dict(batch))
        sums, tokens = trainer.source_losses.sums, trainer.source_losses.counts
        assert tokens.min() > 0
        torch.testing.assert_close(sums.sum() / tokens.sum(), loss.float(), rtol=0, atol=1e-5)
        logs = trainer.source_losses.pop_logs(trainer.accelerator)
        expected = {"loss/charts_csv": (sums[0] / tokens[0]).item(), "loss/chats": (sums[1] / tokens[1]).item()}
        assert logs == pytest.approx(expected, rel=1e-6)
        assert trainer.source_losses.sums is None  # the sums restart after a log


def dpo_mixture_recipe(preference_registry, tiny_qwen, output_dir, **changes):
    """The demo DPO recipe on the two preference sources mixed 3:1."""
    recipe = yaml.safe_load((REPO_ROOT / "recipes" / "demo" / "dpo_lora.yaml").read_text())
    for key in ("dataset_name", "formatter", "dataset_train_split", "dataset_test_split", "max_train_samples"):
        recipe.pop(key)
    recipe.update(
        model_name_or_path=str(tiny_qwen),
        dataset_registry=str(preference_registry),
        datasets=[{"name": "pairs_csv", "weight": 3}, {"name": "pairs_jsonl", "weight": 1}],
        output_dir=str(output_dir),
        **changes,
    )
    path = output_dir.parent / "dpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_dpo_loss_per_source_averages_to_the_loss_padded_and_packed(preference_registry, tiny_qwen, tmp_path):
    """Each pair's DPO loss as TRL computes it, grouped by source: weighted by their pairs, the per-source losses are
    the batch's loss, and the per-source reward accuracies TRL's, for padded and packed pairs and a weighted sum of
    two loss types."""
    from vlm_recipes import dpo
    from vlm_recipes.compat import mark_dpo_loss_weights

    recipe = dpo_mixture_recipe(
        preference_registry, tiny_qwen, tmp_path / "out", dtype="float32", per_device_train_batch_size=8,
        train_sampling_strategy="sequential",  # the mixture's order: length grouping would batch sources apart
    )  # fmt: skip
    trainer = dpo.build_trainer(parse_recipe(dpo.DPORecipe, [str(recipe)]))
    assert trainer.source_results.names == ("pairs_csv", "pairs_jsonl")
    torch.manual_seed(0)
    for name, parameter in trainer.model.named_parameters():
        if "lora_B" in name:  # the policy away from its reference (a new adapter starts equal): losses differ by pair
            parameter.data.normal_(0, 0.3)
    batch = next(batch for batch in trainer.get_train_dataloader() if batch[SOURCE_IDS].unique().numel() == 2)
    batch = trainer._prepare_inputs(batch)
    pairs = len(batch[SOURCE_IDS])
    for key, value in batch.items():  # pair 0 with chosen and rejected swapped: its reward comparison turns around
        if isinstance(value, torch.Tensor) and key != SOURCE_IDS and value.shape[0] == 2 * pairs:
            value[[0, pairs]] = value[[pairs, 0]].clone()
    trainer.model.train()
    for packs_rows, loss_types, weights in ((False, ["sigmoid"], [1.0]), (True, ["sigmoid"], [1.0]),
                                            (False, ["sigmoid", "bco_pair"], [1.0, 0.5])):  # fmt: skip
        trainer.packs_rows, trainer.loss_types, trainer.loss_weights = packs_rows, loss_types, weights
        mark_dpo_loss_weights(trainer)
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, dict(batch))
        losses, accuracies = trainer.source_results.losses, trainer.source_results.accuracies
        assert losses.counts.min() > 0 and losses.counts.sum() == pairs  # every pair, once
        torch.testing.assert_close(losses.sums.sum() / losses.counts.sum(), loss.float(), rtol=0, atol=1e-5)
        trl_accuracy = trainer._metrics["train"]["rewards/accuracies"][-1]
        assert 0 < trl_accuracy < 1  # pairs on both sides: the comparison is not the same for all
        assert float(accuracies.sums.sum() / accuracies.counts.sum()) == pytest.approx(trl_accuracy, abs=1e-6)
        expected = {
            **{f"loss/{name}": (losses.sums[i] / losses.counts[i]).item() for i, name in enumerate(losses.names)},
            **{
                f"rewards/accuracies/{name}": (accuracies.sums[i] / accuracies.counts[i]).item()
                for i, name in enumerate(accuracies.names)
            },
        }
        logs = trainer.source_results.pop_logs(trainer.accelerator)
        assert logs == pytest.approx(expected, rel=1e-6)
        assert logs["loss/pairs_csv"] != pytest.approx(logs["loss/pairs_jsonl"])
        assert losses.sums is None and accuracies.sums is None  # the sums restart after a log


@pytest.mark.e2e
@pytest.mark.extended  # ~20 s on 2 cores; the SFT mixture run is the default suite's end-to-end mixture
def test_dpo_trains_on_a_3_to_1_mixture_of_preference_sources(preference_registry, tiny_qwen, tmp_path):
    from vlm_recipes import dpo

    recipe = dpo_mixture_recipe(
        preference_registry, tiny_qwen, tmp_path / "out", max_steps=2, per_device_train_batch_size=2, logging_steps=1
    )
    dpo.main([str(recipe)])
    mixture = json.loads((tmp_path / "out" / "data_report.json").read_text())["mixture"]
    assert mixture["pairs_csv"]["train_rows"] == 30  # the weight-3 source, whole
    assert 0 < mixture["pairs_jsonl"]["train_rows"] < 30 and mixture["pairs_jsonl"]["weight"] == 1
    assert len(logged_losses(tmp_path / "out")) == 2
    log = json.loads((tmp_path / "out" / "training_log.json").read_text())
    logged = {key for entry in log for key in entry}  # both sources over the run (a step of 2 pairs may hold one)
    assert {
        "loss/pairs_csv",
        "loss/pairs_jsonl",
        "rewards/accuracies/pairs_csv",
        "rewards/accuracies/pairs_jsonl",
    } <= logged
    assert (tmp_path / "out" / "training_plot.png").is_file()


def test_a_second_process_reads_the_checked_mixture_from_the_cache(two_sources, tiny_qwen, tmp_path, monkeypatch):
    """What another process does under `main_process_first` (the same calls, the cache now present): the same draw, and
    no row checked again. The JSONL source is built in memory; its fingerprint comes from the files, not at random."""
    import datasets
    from transformers import AutoProcessor

    from vlm_recipes.configs import ReliabilityArguments
    from vlm_recipes.data import checks

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    calls = []
    check_row = checks.check_row
    monkeypatch.setattr(checks, "check_row", lambda *args, **kwargs: calls.append(1) or check_row(*args, **kwargs))
    processor = AutoProcessor.from_pretrained(tiny_qwen)

    def prepare(sources):
        args = mixture_args(two_sources, datasets=sources)
        train, evaluation, report = load_datasets(args, seed=3, need_eval=True, task="sft")
        return checks.check_training_data(train, evaluation, report, processor, ReliabilityArguments(), None)

    # the JSONL source alone (every dataset in memory), and mixed 3:1 with the CSV one (read from files)
    chats = {"name": "chats", "weight": 1, "max_samples": 40}  # 40 of its rows: enough to see, quick to check
    for sources in ([chats], [{"name": "charts_csv", "weight": 3, "max_samples": 40}, chats]):
        before = len(calls)
        first_train, first_eval = prepare(sources)
        assert len(calls) - before == len(first_train) + len(first_eval) > 0
        second_train, second_eval = prepare(sources)
        assert len(calls) - before == len(first_train) + len(first_eval)  # read from the cache, not checked again
        for first, second in ((first_train, second_train), (first_eval, second_eval)):
            assert first["source_row"] == second["source_row"] and first["data_source"] == second["data_source"]
