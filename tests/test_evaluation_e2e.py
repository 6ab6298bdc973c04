"""Evaluation during training and through `python -m vlm_recipes.evaluate`, merging, chat, and the push at the end of
training, on the tiny model. One short training run (in this process, so the Hub stand-in can record the push) feeds
every test here; it evaluates five sets at once, one of each task kind: ChartQA (its own split), DocVQA (ANLS), TextVQA
(VQA accuracy), ScienceQA-style multiple choice, and conversations from a JSONL file."""

import json
import shutil

import pytest
import torch
import yaml
from conftest import REPO_ROOT, assert_ok, run_module
from test_hub import TOKEN, HubStandIn

from vlm_recipes.configs import DataArguments
from vlm_recipes.data.loading import load_datasets
from vlm_recipes.tasks import get_task


pytestmark = pytest.mark.e2e

SYSTEM_PROMPT = "Answer the question about the chart with a single word or number."  # the demo recipe's
EVAL_ROWS = 6
EXTRA_ROWS = 2  # rows of each other task's set, in training and in `evaluate`


def eval_datasets(task_datasets):
    """The run's evaluation sets (JSON objects, as on the command line): one per task kind."""
    sets = [
        {"name": "chartqa"},  # the recipe's own split, asked as it trained
        {"name": "docs", "dataset": str(task_datasets["docvqa"]), "task": "docvqa", "prompt_preset": "lmms_eval"},
        {"name": "signs", "dataset": str(task_datasets["textvqa"]), "task": "textvqa", "prompt_preset": "vlmevalkit"},
        {"name": "shapes", "dataset": str(task_datasets["scienceqa"]), "task": "multiple_choice",
         "prompt_preset": "lmms_eval"},
        {"name": "own", "dataset": str(task_datasets["conversations"]), "task": "conversation", "split": "train"},
    ]  # fmt: skip
    return [json.dumps({**entry, "max_samples": EXTRA_ROWS} if "dataset" in entry else entry) for entry in sets]


SET_TASKS = {
    "chartqa": "chartqa",
    "docs": "docvqa",
    "signs": "textvqa",
    "shapes": "multiple_choice",
    "own": "conversation",
}


class LogRecorder:
    """Stands in for a logger integration (wandb, trackio, tensorboard): it sees what their `on_log` sees."""

    def __init__(self):
        from transformers import TrainerCallback

        recorder = self

        class Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                recorder.logs.append(dict(logs))

        self.logs, self.callback = [], Callback()


@pytest.fixture(scope="module")
def trained(tiny_qwen, chartqa_dir, task_datasets, tmp_path_factory):
    """A 6-step LoRA run that evaluates five sets by generation at steps 3 and 6 and pushes to a (stand-in) Hub."""
    from vlm_recipes import sft

    output_dir = tmp_path_factory.mktemp("eval") / "run"
    recorder, hub = LogRecorder(), HubStandIn()
    build_trainer = sft.build_trainer

    def build_and_record(recipe):
        trainer = build_trainer(recipe)
        trainer.add_callback(recorder.callback)
        return trainer

    with pytest.MonkeyPatch.context() as patch:
        hub.install(patch)
        patch.setenv("HF_TOKEN", TOKEN)
        patch.setattr(sft, "build_trainer", build_and_record)
        sft.main(
            [
                str(REPO_ROOT / "recipes" / "demo" / "sft_lora.yaml"),
                "--model_name_or_path", str(tiny_qwen), "--dataset_name", str(chartqa_dir),
                "--output_dir", str(output_dir), "--overwrite_output_dir", "false", "--dtype", "float32",
                "--max_train_samples", "16", "--max_eval_samples", "8", "--max_steps", "6", "--logging_steps", "1",
                "--eval_strategy", "steps", "--eval_steps", "3", "--eval_generation_rows", "4", "--max_new_tokens", "4",
                "--per_device_eval_batch_size", "4", "--eval_datasets", *eval_datasets(task_datasets),
                "--push_to_hub", "true", "--hub_model_id", "me/tiny-chartqa", "--hub_private_repo", "true",
            ]
        )  # fmt: skip
    return output_dir, recorder, hub


def test_every_set_is_evaluated_and_logged_at_every_evaluation(trained):
    output_dir, recorder, _ = trained
    log = json.loads((output_dir / "training_log.json").read_text())
    for name, task in SET_TASKS.items():
        for metric in get_task(task).metric_names:
            values = {
                entry["step"]: entry[f"eval_{name}/{metric}"] for entry in log if f"eval_{name}/{metric}" in entry
            }
            assert set(values) == {3, 6} and all(0.0 <= value <= 1.0 for value in values.values()), (name, metric)
    chartqa = [entry for entry in log if "eval_chartqa/relaxed_accuracy" in entry]
    assert all(e["eval_chartqa/relaxed_accuracy"] <= e["eval_chartqa/relaxed_accuracy_normalized"] for e in chartqa)
    assert [entry["step"] for entry in log if "eval_loss" in entry] == [3, 6]  # the Trainer's own evaluation runs

    from transformers.integrations.integration_utils import rewrite_logs

    logged = [logs for logs in recorder.logs if "eval_docs/anls" in logs]
    assert len(logged) == 2  # what every logger integration receives...
    shown = rewrite_logs(logged[0])  # ...and shows as eval/<set>/<metric>
    assert {"eval/chartqa/relaxed_accuracy", "eval/docs/anls", "eval/signs/vqa_accuracy", "eval/shapes/accuracy",
            "eval/shapes/unparsed", "eval/own/token_f1"} <= set(shown)  # fmt: skip


def test_a_plot_of_the_training_lands_in_the_output_folder(trained):
    from PIL import Image

    output_dir, _, _ = trained
    plot = Image.open(output_dir / "training_plot.png")
    assert plot.format == "PNG" and plot.size[0] > 1.5 * plot.size[1]  # loss panel and evaluation panel


def test_the_adapter_is_pushed_once_at_the_end_with_its_card(trained):
    output_dir, _, hub = trained
    assert [repo["private"] for repo in hub.repos] == [True]
    (commit,) = hub.commits
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "training_plot.png"} <= set(
        commit["files"]
    )
    assert {"tokenizer.json", "processor_config.json", "recipe.yaml", "training_log.json"} <= set(commit["files"])
    assert not any(name.endswith((".bin", ".pt", ".pth")) or "/" in name for name in commit["files"])
    card = commit["files"]["README.md"].decode()
    assert "chartqa/relaxed_accuracy" in card and "training loss:" in card and "me/tiny-chartqa" in card
    # Not evaluated by the command yet: model-index holds each set's last evaluation during training.
    results = yaml.safe_load(card.split("---")[1])["model-index"][0]["results"]
    assert [result["dataset"]["type"] for result in results] == list(SET_TASKS)  # local data: named, no paths
    assert all(m["args"]["during_training_at_step"] == 6 for result in results for m in result["metrics"])
    assert (output_dir / "README.md").read_text() == card  # the local folder holds the same card
    info = json.loads(commit["files"]["run_info.json"])  # the trainer's resolved settings, for the card
    assert info["global_batch"] == info["per_device_train_batch_size"] * info["gradient_accumulation_steps"]
    assert info["steps"] == 6 and info["train_runtime_seconds"] > 0 and info["hardware"].startswith("CPU")
    assert f"- global batch: {info['global_batch']} = " in card and "- steps: 6 (" in card
    assert "## Framework versions" in card and f"- trl: {info['framework_versions']['trl']}" in card
    assert "## Intended use and limitations" in card
    assert all(str(output_dir.parent) not in content.decode(errors="ignore") for content in commit["files"].values())
    recipe = (output_dir / "recipe.yaml").read_text()
    assert "push_to_hub: true" in recipe and TOKEN not in recipe and TOKEN not in card


def test_the_card_usage_snippet_runs(trained, tiny_qwen, tmp_path, monkeypatch, capsys):
    """The card's Python snippet, with this machine's folders as the repository and the base (the card names a local
    base by its folder's name only), loads the adapter and answers."""
    from PIL import Image

    from vlm_recipes.hub.card import model_card
    from vlm_recipes.run_folder import SavedRun

    output_dir = trained[0]
    card = model_card(SavedRun.read(output_dir), str(output_dir), None)
    snippet = card.split("## Usage\n\n```python\n", 1)[1].split("```", 1)[0]
    assert "PeftModel.from_pretrained(base," in snippet and f'"{tiny_qwen.name}"' in snippet
    snippet = snippet.replace(f'"{tiny_qwen.name}"', f'"{tiny_qwen}"').replace(
        f'"{output_dir.name}"', f'"{output_dir}"'
    )
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (112, 84), "white").save(tmp_path / "chart.png")
    scope = {}
    exec(compile(snippet.replace("max_new_tokens=32", "max_new_tokens=4"), "card-snippet", "exec"), scope)
    assert scope["output"].shape[1] > scope["inputs"]["input_ids"].shape[1]  # it generated, and printed the answer
    assert capsys.readouterr().out.endswith("\n")


def test_evaluate_results_beside_a_run_go_into_its_card(trained, evaluated, tmp_path):
    """`evaluate --output_dir` the run's own folder: eval_results.json lands beside the adapter and the card shows it
    (what the command does after writing it: `write_card_at_save`)."""
    from vlm_recipes.hub.card import write_card_at_save

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    shutil.copyfile(evaluated[0] / "eval_results.json", run / "eval_results.json")
    assert write_card_at_save(run)
    card = (run / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    results = metadata["model-index"][0]["results"]
    assert "base_model" not in metadata  # a local base model is never named by its path
    adapter = json.loads((run / "eval_results.json").read_text())["eval_sets"]["chartqa"]["results"]["adapter"]
    chartqa = next(result for result in results if result["dataset"]["type"] == "chartqa")
    assert chartqa["metrics"][0]["value"] == round(adapter["relaxed_accuracy"], 4)
    assert "during_training_at_step" not in str(results)  # the command's results, not the training log's
    assert "### chartqa" in card and "| relaxed_accuracy |" in card


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    output_dir, _, _ = trained
    results_dir = tmp_path_factory.mktemp("results")
    result = run_module(
        "vlm_recipes.evaluate", output_dir / "recipe.yaml", "--adapter", output_dir, "--output_dir", results_dir,
        "--max_eval_samples", EVAL_ROWS, "--max_new_tokens", 4, "--per_device_eval_batch_size", 4,
    )  # fmt: skip
    assert_ok(result)
    return results_dir, result


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_evaluate_scores_every_set_with_its_task_and_records_the_preset(evaluated, tiny_qwen, trained):
    results_dir, result = evaluated
    results = json.loads((results_dir / "eval_results.json").read_text())
    assert results["adapter"] == str(trained[0]) and results["base_model"] == str(tiny_qwen)
    assert list(results["eval_sets"]) == list(SET_TASKS)
    presets = {"chartqa": "recipe", "docs": "lmms_eval", "signs": "vlmevalkit", "shapes": "lmms_eval", "own": "recipe"}
    for name, task_name in SET_TASKS.items():
        entry, task = results["eval_sets"][name], get_task(task_name)
        assert entry["task"] == task_name and entry["prompt_preset"] == presets[name]
        assert entry["prompt_source"] == task.preset(presets[name]).source
        assert entry["rows"] == (EVAL_ROWS if name == "chartqa" else EXTRA_ROWS) and entry["max_new_tokens"] == 4
        for model in ("base", "adapter"):
            rows = read_jsonl(results_dir / f"predictions_{name}_{model}.jsonl")
            assert len(rows) == entry["rows"] and entry["results"][model]["rows_per_second"] > 0
            # Every number in eval_results.json is the task's own mean over the rows in the predictions file.
            for metric in task.metric_names:
                mean = sum(row[metric] for row in rows) / len(rows)
                assert entry["results"][model][metric] == pytest.approx(mean), (name, model, metric)
        header = f"Evaluation set '{name}': {task.title} on "
        assert header in result.stdout and f"prompt preset '{presets[name]}'" in result.stdout
    assert result.stdout.count("rows/s: base ") == len(SET_TASKS)
    assert results["eval_sets"]["chartqa"]["split"] == "test"


def test_evaluate_compares_base_and_adapter_on_the_same_rows(evaluated):
    results_dir, result = evaluated
    predictions = {
        model: read_jsonl(results_dir / f"predictions_chartqa_{model}.jsonl") for model in ("base", "adapter")
    }
    for rows in predictions.values():
        assert set(rows[0]) >= {"question", "labels", "prediction", "relaxed_accuracy", "exact_match"}
        chartqa = get_task("chartqa")
        for row in rows:  # the recorded values are the task's scores of the recorded prediction
            values = chartqa.score(row["prediction"], {"answers": row["labels"], "messages": []}).values
            assert {metric: row[metric] for metric in values} == values
    # The same questions, and different answers: the adapter was on for one and off for the other.
    assert [r["question"] for r in predictions["base"]] == [r["question"] for r in predictions["adapter"]]
    assert [r["prediction"] for r in predictions["base"]] != [r["prediction"] for r in predictions["adapter"]]
    shapes = read_jsonl(results_dir / "predictions_shapes_adapter.jsonl")
    assert all("picked" in row and row["unparsed"] == float(row["picked"] is None) for row in shapes)
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("metric"))
    assert header.split() == ["metric", "base", "adapter", "change"]
    assert any(line.startswith("relaxed_accuracy_normalized") for line in lines)


def test_evaluate_never_overwrites_results(evaluated, trained, capsys):
    from vlm_recipes.evaluate import main

    results_dir, _ = evaluated
    before = (results_dir / "eval_results.json").read_bytes()
    with pytest.raises(SystemExit) as info:
        main([str(trained[0] / "recipe.yaml"), "--adapter", str(trained[0]), "--output_dir", str(results_dir)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "eval_results.json already exists" in err and "--overwrite_results" in err
    assert (results_dir / "eval_results.json").read_bytes() == before


def test_evaluate_without_an_evaluation_split(trained, tmp_path, capsys):
    from vlm_recipes.evaluate import main

    with pytest.raises(SystemExit) as info:
        main([str(trained[0] / "recipe.yaml"), "--dataset_test_split", "validation", "--output_dir", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "no split 'validation'" in err and "eval_split_size" in err
    assert not (tmp_path / "eval_results.json").exists()


def test_chat_answers_like_the_evaluation(evaluated, trained, tiny_qwen, chartqa_dir, tmp_path, capsys):
    from vlm_recipes.chat import main

    results_dir, _ = evaluated
    _, rows, _ = load_datasets(DataArguments(dataset_name=str(chartqa_dir), max_eval_samples=1), need_eval=True)
    image = tmp_path / "chart.png"
    rows[0]["images"][0].save(image)
    question = rows[0]["messages"][-2]["content"][-1]["text"]
    common = ["--image", str(image), "--question", question, "--max_new_tokens", "4", "--dtype", "float32"]

    base_reply = main(["--model", str(tiny_qwen), "--system_prompt", SYSTEM_PROMPT, *common])
    # The base and system prompt from the adapter; --compare answers with the adapter switched off and on
    replies = main(["--adapter", str(trained[0]), "--compare", *common])
    expected = {name: read_jsonl(results_dir / f"predictions_chartqa_{name}.jsonl")[0] for name in ("base", "adapter")}
    assert expected["base"]["question"] == question
    assert base_reply == expected["base"]["prediction"] == replies["base"]
    assert replies["adapter"] == expected["adapter"]["prediction"]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == base_reply and out[-2:] == [f"base> {replies['base']}", f"adapter> {replies['adapter']}"]


@pytest.fixture(scope="module")
def chat_session(trained):
    """The trained adapter loaded once for a conversation, base and adapter answering each turn."""
    from vlm_recipes.chat import Sampling, load_session

    return load_session(adapter=str(trained[0]), compare=True, sampling=Sampling(max_new_tokens=4), dtype="float32")


def test_chat_holds_a_conversation_with_images(chat_session, tmp_path):
    import io

    from PIL import Image

    from vlm_recipes.chat import chat_loop

    session = chat_session
    session.reset()
    image = tmp_path / "chart.png"
    Image.new("RGB", (96, 64), "orange").save(image)
    inputs = []
    generate = session.model.generate

    def recording_generate(**kwargs):
        inputs.append(kwargs)
        return generate(**kwargs)

    session.model.generate = recording_generate
    try:
        script = (
            f"/image {tmp_path / 'missing.png'}\n/image {image}\nHow many bars?\n\nAnd the tallest?\n/quit\nnot read\n"
        )
        out = io.StringIO()
        chat_loop(session, io.StringIO(script), out)
    finally:
        del session.model.generate
    shown = out.getvalue()
    assert f"error: --image {tmp_path / 'missing.png'}: the image" in shown  # one line, and the loop went on
    assert f"(image {image} goes with your next message)" in shown
    # Two turns, each answered by both sides, streamed under their names; the image went with the first turn only
    assert len(inputs) == 4 and all("pixel_values" in call for call in inputs)
    first, second = session.messages["adapter"][1], session.messages["adapter"][3]
    assert [block["type"] for block in first["content"]] == ["image", "text"]
    assert [block["type"] for block in second["content"]] == ["text"]
    assert inputs[2]["input_ids"].shape[1] > inputs[0]["input_ids"].shape[1]  # the history went into the prompt
    for side in ("base", "adapter"):
        roles = [message["role"] for message in session.messages[side]]
        assert roles == ["system", "user", "assistant", "user", "assistant"]
        for turn in (2, 4):
            assert f"{side}> {session.messages[side][turn]['content'][0]['text']}" in shown
    assert "not read" not in shown and shown.count("you> ") == 6  # the empty line asks again

    chat_loop(session, io.StringIO("/reset\n"), io.StringIO())
    assert [message["role"] for message in session.messages["adapter"]] == ["system"] and session.images == []


def test_chat_sampling_options(tiny_qwen):
    from transformers import AutoProcessor

    from vlm_recipes.chat import Sampling

    processor = AutoProcessor.from_pretrained(tiny_qwen)
    model = type("Model", (), {"generation_config": None})()
    greedy = Sampling(max_new_tokens=7).generation_config(model, processor)
    assert greedy.do_sample is False and greedy.max_new_tokens == 7
    sampled = Sampling(temperature=0.7, top_p=0.9).generation_config(model, processor)
    assert sampled.do_sample is True and sampled.temperature == 0.7 and sampled.top_p == 0.9


def test_merged_model_gives_the_logits_of_base_plus_adapter(trained, tiny_qwen, tmp_path, capsys):
    """Merging an adapter trained with QLoRA: the base loads in 32 bit, and the merged weights give base + adapter."""
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_recipes.merge import main

    adapter = tmp_path / "qlora_adapter"
    shutil.copytree(trained[0], adapter)
    recipe = yaml.safe_load((adapter / "recipe.yaml").read_text())
    assert recipe["tuning_strategy"] == "lora"
    (adapter / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "tuning_strategy": "qlora", "dtype": "bfloat16"}))
    merged_dir = main(["--adapter", str(adapter), "--output_dir", str(tmp_path / "merged"), "--dtype", "float32"])
    assert "trained with QLoRA: the base loads unquantized" in capsys.readouterr().out

    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    files = {path.name for path in merged_dir.iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files and "adapter_config.json" not in files
    card = (merged_dir / "README.md").read_text()  # the package's card, not a library's boilerplate
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-text-to-text"
    assert "A fine-tune of" in card and "- global batch:" in card and "## Intended use and limitations" in card

    processor = AutoProcessor.from_pretrained(merged_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many bars?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[Image.new("RGB", (112, 84), "orange")], return_tensors="pt")
    with torch.no_grad():
        base = AutoModelForImageTextToText.from_pretrained(tiny_qwen, dtype=torch.float32)
        base_logits = base(**inputs).logits
        with_adapter = PeftModel.from_pretrained(base, adapter)(**inputs).logits
        merged = AutoModelForImageTextToText.from_pretrained(merged_dir)(**inputs).logits
    assert (with_adapter - base_logits).abs().max() > 1e-2  # the adapter changes the outputs...
    assert torch.allclose(merged, with_adapter, atol=1e-4, rtol=1e-4)  # ...and the merged model reproduces them


def test_adapter_of_another_architecture_is_refused(trained, tiny_models, tmp_path, capsys):
    from vlm_recipes.chat import main

    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (64, 64)).save(image)
    ask = ["--image", str(image), "--question", "Q?", "--max_new_tokens", "2"]

    with pytest.raises(SystemExit) as info:
        main(["--model", str(tiny_models("qwen2_vl")), "--adapter", str(trained[0]), *ask])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"The adapter in {trained[0]} was trained on" in err and "model_type qwen2_5_vl vs qwen2_vl" in err

    # An adapter for a wider model of the same family (as a 7B adapter on a 3B base): its weights do not fit.
    from safetensors.torch import load_file, save_file

    wider = tmp_path / "wider"
    shutil.copytree(trained[0], wider)
    weights = load_file(wider / "adapter_model.safetensors")
    save_file(
        {name: torch.zeros(t.shape[0], 96) if "lora_A" in name else t for name, t in weights.items()},
        str(wider / "adapter_model.safetensors"),
    )
    with pytest.raises(SystemExit):
        main(["--adapter", str(wider), *ask])
    err = capsys.readouterr().err
    assert f"The adapter in {wider} does not fit" in err and "size mismatch" in err and "Traceback" not in err

    with pytest.raises(SystemExit):
        main(["--adapter", str(tmp_path), *ask])
    assert "holds no LoRA adapter (no adapter_config.json)" in capsys.readouterr().err


def test_help_lists_the_evaluation_fields(capsys):
    from vlm_recipes.evaluate import main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    fields = ("--adapter", "--evaluate_base", "--overwrite_results", "--eval_generation_rows", "--max_new_tokens", "--task",
              "--prompt_preset", "--eval_datasets")  # fmt: skip
    for field in fields:
        assert field in out


@pytest.mark.extended  # ~10 s more on 2 cores (Gradio's import and server start), 38 s on a loaded machine
def test_chat_web_page_answers_through_gradios_client(chat_session, tmp_path, monkeypatch):
    """The page (`chat --ui`) on localhost, driven headless through gradio_client: an uploaded image and a message,
    base and adapter each answering in their column, then a new conversation."""
    gradio_client = pytest.importorskip("gradio_client", reason="the `ui` extra (gradio) is not installed")
    import socket

    from PIL import Image

    from vlm_recipes.chat_ui import launch

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    chat_session.reset()
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = launch(chat_session, port=port, block=False)
    try:
        image = tmp_path / "upload.png"
        Image.new("RGB", (64, 48), "red").save(image)
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        base, adapter, image_box, message_box = client.predict(
            "How many bars?", gradio_client.handle_file(str(image)), api_name="/ask"
        )
        for side, column in (("base", base), ("adapter", adapter)):
            assert [turn["role"] for turn in column] == ["user", "assistant"]
            assert column[0]["content"][0]["text"] == "[1 image] How many bars?"
            reply = chat_session.messages[side][-1]["content"][0]["text"]
            assert [block.get("text") for block in column[1]["content"]] in ([reply], [])  # an empty reply shows none
        assert len(chat_session.images) == 1 and image_box is None and message_box == ""
        assert client.predict(api_name="/reset")[:2] == ([], [])
        assert chat_session.images == []
    finally:
        app.close()
