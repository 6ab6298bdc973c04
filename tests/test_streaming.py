"""Streamed training data (`data.streaming`): rows formatted and checked as the trainer reads them, bad rows counted in
a running report, `max_steps` required, a mixture interleaved by weight; one short SFT run through the entry point."""

import json
import re

import pytest
import torch
import yaml
from conftest import REPO_ROOT, assert_ok, console_log_lines, logged_losses, run_in_process
from PIL import Image

from vlm_recipes import preflight
from vlm_recipes.configs import DataArguments
from vlm_recipes.data.report import DataReport
from vlm_recipes.data.streaming import StreamReport, checked_stream, stream_datasets
from vlm_recipes.errors import DataError
from vlm_recipes.sft import main


ROWS = 40


@pytest.fixture(scope="module")
def chat_lines(tmp_path_factory):
    """A JSONL file of 40 chart conversations; line 2 has an empty answer and line 3 an image that does not exist."""
    from vlm_recipes.data.synthetic import make_chartqa_rows

    root = tmp_path_factory.mktemp("stream")
    charts = make_chartqa_rows(4, seed=3)
    for index, chart in enumerate(charts):
        chart["image"].save(root / f"chart{index}.png")
    lines = []
    for index in range(ROWS):
        chart = charts[index % 4]
        answer = "" if index == 1 else chart["label"][0]
        image = "missing.png" if index == 2 else f"chart{index % 4}.png"
        lines.append({"images": [image], "messages": [
            {"role": "user", "content": "<image>" + chart["query"]}, {"role": "assistant", "content": answer}]})  # fmt: skip
    (root / "chats.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return root


def test_stream_counts_each_row_once_groups_within_the_buffer_and_stops_on_bad_rows(chat_lines, tiny_qwen):
    from transformers import AutoProcessor

    from vlm_recipes.configs import ReliabilityArguments
    from vlm_recipes.data.checks import check_policy
    from vlm_recipes.data.lengths import TokenCounter

    processor = AutoProcessor.from_pretrained(tiny_qwen)
    args = DataArguments(dataset_name=str(chat_lines / "chats.jsonl"), formatter="conversations", streaming=True,
                         eval_split_size=1, max_bad_fraction=0.1)  # fmt: skip
    mixed, evaluation, running = stream_datasets(args, seed=0, need_eval=True, task="sft")
    assert evaluation["source_row"] == ["line 1"]  # the stream's first row, held out
    counter, policy = TokenCounter(processor), check_policy(processor, ReliabilityArguments(), None)
    stream = checked_stream(mixed, running, counter, policy, seed=0, buffer_size=8, global_batch=2)
    first = list(stream)
    assert len(first) == ROWS - 1 - 2  # line 2's answer is empty, line 3's image missing
    assert [row["source_row"] for row in first] == [row["source_row"] for row in stream]  # the same order every pass
    assert running.report.splits["train"].rows == ROWS - 1  # counted once, not once per pass
    assert "line 1" not in [row["source_row"] for row in first]
    assert "line 3" in json.dumps(running.report.to_dict()["train"]["rejected_by_reason"])
    lengths = [counter.count(row["messages"], [image.size for image in row["images"]]).total for row in first[:8]]
    pairs = [sorted(lengths[index : index + 2]) for index in range(0, 8, 2)]
    assert all(a[1] <= b[0] or b[1] <= a[0] for a in pairs for b in pairs if a is not b)  # batches do not overlap

    strict = StreamReport(DataReport(), max_bad_fraction=0.0, stop_after_rows=3)
    strict.report.split("train", "chats.jsonl", 0)
    again, _, _ = stream_datasets(DataArguments(**{**vars(args), "eval_split_size": None, "dataset_test_split": "none"}),
                                  seed=0, need_eval=False, task="sft")  # fmt: skip
    with pytest.raises(DataError, match=r"max_bad_fraction 0%\), so the run stops after 3 rows"):
        list(checked_stream(again, strict, counter, policy, seed=0, buffer_size=8, global_batch=None))
    assert strict.report.splits["train"].rows == 3  # stopped as soon as 3 rows were read


def test_a_mixture_streams_by_weight(chat_lines, tmp_path):
    registry = {"a": {"source": str(chat_lines / "chats.jsonl"), "formatter": "conversations"}}
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump({**registry, "b": registry["a"]}))
    args = DataArguments(dataset_registry=str(tmp_path / "registry.yaml"), streaming=True,
                         datasets=[{"name": "a", "weight": 3}, {"name": "b", "weight": 1}])  # fmt: skip
    mixed, _, running = stream_datasets(args, seed=1, need_eval=False, task="sft")
    rows = list(checked_stream(mixed, running, None, None, seed=1, buffer_size=1000, global_batch=None))
    assert {row["data_source"] for row in rows} == {"a", "b"}
    counts = running.report.to_dict()["mixture"]
    assert counts["a"]["train_rows"] == ROWS - 1  # the weight-3 source runs out first; only its empty answer is out
    assert 0 < counts["b"]["train_rows"] < counts["a"]["train_rows"]


@pytest.mark.e2e
def test_sft_streams_an_augmented_jsonl_source_and_refuses_a_run_without_max_steps(
    tiny_qwen, chat_lines, tmp_path, capsys
):
    recipe = yaml.safe_load((REPO_ROOT / "recipes" / "demo" / "sft_lora.yaml").read_text())
    for key in ("dataset_train_split", "dataset_test_split", "max_train_samples"):
        recipe.pop(key)
    recipe.update(
        model_name_or_path=str(tiny_qwen),
        dataset_name=str(chat_lines / "chats.jsonl"),
        formatter="conversations",
        dataset_test_split="none",
        streaming=True,
        shuffle_buffer_size=8,
        max_bad_fraction=0.1,
        augmentation={"brightness": 0.2, "crop": 0.05, "resolution": 0.2},  # training batches only
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        logging_steps=1,
    )
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    main([str(tmp_path / "recipe.yaml")])
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["train"]["rejected"] == 2, report["train"]  # lines 2 and 3, read before the buffer filled
    assert 10 <= report["train"]["rows"] < ROWS  # a stream is read only as far as training needs
    assert len(logged_losses(tmp_path / "out")) == 2

    preflight.main([str(tmp_path / "recipe.yaml"), "--show_augmentation", str(tmp_path / "grid.png"),
                    "--augmentation_samples", "2", "--augmentation_variants", "3"])  # fmt: skip
    assert Image.open(tmp_path / "grid.png").size == (4 * 256, 2 * (256 + 18))  # originals + 3 augmentations

    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path / "recipe.yaml"), "--max_steps", "-1", "--output_dir", str(tmp_path / "out2")])
    assert stopped.value.code == 2
    assert "max_steps" in capsys.readouterr().err and not (tmp_path / "out2").exists()


def test_two_processes_each_train_their_share_of_every_global_batch(chat_lines, tiny_qwen, tmp_path, monkeypatch):
    """The training loader as the trainer builds it under `accelerate launch --num_processes 2`, for process 0 and 1
    (accelerate's process count and index set, no launch): each process reads the whole stream and keeps its share of
    each global batch (TRL turns accelerate's batch dispatching off for a stream), so one pass trains every row once,
    and the last global batch, short of rows, is filled from the first, so that neither process waits on the other;
    each process's running report counts every position once and reads the same, and so stops on the same row."""
    from accelerate import Accelerator
    from accelerate.data_loader import IterableDatasetShard

    from vlm_recipes.recipe import parse_recipe
    from vlm_recipes.sft import SFTRecipe, build_trainer

    good = [index for index in range(ROWS - 1) if index != 1]  # 38 rows (line 2's answer is empty): 9.5 global batches
    lines = [{"images": [str(chat_lines / f"chart{index % 4}.png")], "messages": [
        {"role": "user", "content": "<image>What is shown?"}, {"role": "assistant", "content": f"Row {index}." if index != 1 else ""}
    ]} for index in range(ROWS - 1)]  # fmt: skip
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    recipe = yaml.safe_load((REPO_ROOT / "recipes" / "demo" / "sft_lora.yaml").read_text())
    for key in ("dataset_train_split", "max_train_samples"):
        recipe.pop(key)
    recipe.update(model_name_or_path=str(tiny_qwen), dataset_name=str(tmp_path / "rows.jsonl"), formatter="conversations",
                  dataset_test_split="none", streaming=True, shuffle_buffer_size=8, max_bad_fraction=0.1, max_steps=3,
                  per_device_train_batch_size=2, dtype="float32", bf16=False)  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    process = {"index": 0}
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    monkeypatch.setattr(Accelerator, "process_index", property(lambda self: process["index"]))
    passes, reports = [], []
    for index in (0, 1):  # each process builds its own trainer, stream and running report
        process["index"] = index
        trainer = build_trainer(
            parse_recipe(SFTRecipe, [str(tmp_path / "recipe.yaml"), "--output_dir", str(tmp_path / f"out{index}")])
        )
        seen: list[list[int]] = []

        def record(examples, seen=seen):
            seen.append(
                [int(re.search(r"Row (\d+)\.", json.dumps(example["messages"])).group(1)) for example in examples]
            )
            return {"rows": torch.tensor([len(examples)])}

        trainer.data_collator = record
        loader = trainer.get_train_dataloader()
        shard = loader.dataset
        assert isinstance(shard, IterableDatasetShard) and (shard.num_processes, shard.process_index) == (2, index)
        for _ in range(2):  # two passes (epochs of the stream)
            for _batch in loader:
                pass
        passes.append(seen)
        reports.append(trainer.train_dataset.stream_report)

    first, second = passes
    assert len(first) == len(second) == 2 * 10  # 10 batches a pass on each: the half global batch at the end filled
    assert all(len(batch) == 2 for batch in first + second)  # no short or empty batch on either process
    one_pass = [row for batches in (first[:10], second[:10]) for batch in batches for row in batch]
    assert sorted(set(one_pass)) == good  # every row of the stream trained in the pass
    refill = [row for row in one_pass if one_pass.count(row) > 1]
    assert len(one_pass) - len(good) == 2 and sorted(set(refill)) == sorted(set(first[0] + second[0]) & set(refill))
    assert first[10:] + second[10:] == first[:10] + second[:10]  # the second pass: the same rows, the same split
    for running in reports:  # every position once, on each process, though each read the stream twice
        assert running.positions_read == ROWS - 1 and running.report.splits["train"].rows == ROWS - 1
        assert running.report.splits["train"].rejected == 1
    assert reports[0].report.to_dict() == reports[1].report.to_dict()
    for running in reports:  # the max_bad_fraction stop reads the same counts on both: the same verdict
        running.max_bad_fraction = 0.0
        with pytest.raises(DataError, match=r"1 of 39 rows of the 'train' split were rejected"):
            running.stop_if_too_many_rejected()


@pytest.mark.e2e
def test_a_resumed_streamed_run_trains_the_rows_an_uninterrupted_run_trains(
    tiny_qwen, chat_lines, tmp_path, monkeypatch, capsys
):
    """2 steps with a checkpoint at step 2, then `--max_steps 4 --resume_from_checkpoint true`: steps 3-4 of the resumed
    run train the same batches, token for token, as steps 3-4 of one uninterrupted 4-step run, from the same weights."""
    import torch

    from vlm_recipes.training.trainers import VLMSFTTrainer

    # Every row different (its own question and answer), so a batch's token ids say which rows it holds
    lines = [{"images": [str(chat_lines / f"chart{index % 4}.png")], "messages": [
        {"role": "user", "content": f"<image>What is the value of bar number {index}?"},
        {"role": "assistant", "content": str(7 * index + 3)}]} for index in range(24)]  # fmt: skip
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    recipe = yaml.safe_load((REPO_ROOT / "recipes" / "demo" / "sft_lora.yaml").read_text())
    for key in ("dataset_train_split", "max_train_samples"):
        recipe.pop(key)
    recipe.update(
        model_name_or_path=str(tiny_qwen), dataset_name=str(tmp_path / "rows.jsonl"), formatter="conversations",
        dataset_test_split="none", streaming=True, shuffle_buffer_size=6, max_steps=4, per_device_train_batch_size=2,
        logging_steps=1, save_strategy="steps", save_steps=2, overwrite_output_dir=False,
    )  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    trained = []  # the token ids of each batch a training step trains (the resumed run's skipped batches never get here)
    train_step = VLMSFTTrainer.training_step

    def recording_step(self, model, inputs, *args, **kwargs):
        trained.append(inputs["input_ids"].clone())
        return train_step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(VLMSFTTrainer, "training_step", recording_step)

    def run(output_dir, *extra):
        trained.clear()
        result = run_in_process("vlm_recipes.sft", tmp_path / "recipe.yaml", "--output_dir", output_dir, *extra,
                                capsys=capsys)  # fmt: skip
        assert_ok(result)
        return list(trained), result

    whole, _ = run(tmp_path / "whole")
    first, _ = run(tmp_path / "stopped", "--max_steps", "2")
    resumed, result = run(tmp_path / "stopped", "--resume_from_checkpoint", "true")

    assert f"Resuming from the last complete checkpoint: {tmp_path / 'stopped' / 'checkpoint-2'}" in result.stdout
    assert [line.split("  ")[0] for line in console_log_lines(result.stdout + result.stderr)] == [
        "step 3/4",
        "step 4/4",
    ]
    assert len(whole) == 4 and len(first) == len(resumed) == 2
    assert all(torch.equal(a, b) for a, b in zip(first + resumed, whole, strict=True))  # the same rows, step by step
    assert len({tuple(batch.flatten().tolist()) for batch in whole}) == 4  # 4 different batches: equal ids, same rows
    state = json.loads((tmp_path / "stopped" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # ...trained from the checkpoint's weights and optimizer: the same losses as the uninterrupted run
    assert logged_losses(tmp_path / "stopped") == pytest.approx(logged_losses(tmp_path / "whole"), abs=1e-5)
    # The running report counts the rows the skip reads again once: it reads as the uninterrupted run's
    reports = [
        json.loads((tmp_path / name / "data_report.json").read_text())["train"] for name in ("stopped", "whole")
    ]
    assert reports[0]["rows"] == reports[1]["rows"] > 8 and reports[0]["rejected"] == reports[1]["rejected"] == 0
