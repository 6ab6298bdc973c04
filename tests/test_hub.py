"""Pushing to the Hub, tested at the huggingface_hub boundary: stand-ins record what would be sent, and any other
network call fails the test."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import save_file

from vlm_recipes.errors import RecipeError
from vlm_recipes.hub.card import CARD_MARKER, model_card
from vlm_recipes.hub.push import push_output_dir
from vlm_recipes.hub.token import hub_target
from vlm_recipes.push import main as push_main
from vlm_recipes.run_folder import SavedRun


TOKEN = "hf_testTOKEN0123456789abcdefSECRET"
PEFT_TEMPLATE = "---\nlibrary_name: peft\n---\n# Model Card for Model ID\n\n<!-- Provide a quick summary of what the model is/does. -->\n"


class HubStandIn:
    """Records `create_repo` and `create_commit` calls (with the bytes of every file) and answers `model_info`."""

    def __init__(self, license_name=None):
        self.repos, self.commits, self.model_infos = [], [], []
        self.license_name = license_name

    def install(self, monkeypatch):
        import httpx2
        from huggingface_hub import HfApi

        stand_in = self

        def create_repo(api, repo_id, *, private=None, exist_ok=False, repo_type=None, **kwargs):
            stand_in.repos.append({"repo_id": repo_id, "private": private, "token": api.token, "kwargs": kwargs})
            return SimpleNamespace(repo_id=repo_id)

        def create_commit(api, repo_id, operations, *, commit_message, **kwargs):
            files = {
                op.path_in_repo: op.path_or_fileobj
                if isinstance(op.path_or_fileobj, bytes)
                else Path(op.path_or_fileobj).read_bytes()
                for op in operations
            }
            stand_in.commits.append(
                {"repo_id": repo_id, "files": files, "message": commit_message, "token": api.token}
            )
            return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

        def model_info(api, repo_id, **kwargs):
            stand_in.model_infos.append(repo_id)
            return SimpleNamespace(card_data={"license": stand_in.license_name} if stand_in.license_name else None)

        def no_network(*args, **kwargs):
            raise AssertionError("an HTTP request was sent past the stand-ins")

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        monkeypatch.setattr(HfApi, "model_info", model_info)
        monkeypatch.setattr(httpx2.Client, "send", no_network)
        return self


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    """No token anywhere huggingface_hub looks: HF_TOKEN unset, no cached login."""
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))


@pytest.fixture
def output_dir(tmp_path):
    """A finished LoRA run's folder, with what a run leaves that must NOT be pushed."""
    folder = tmp_path / "run"
    folder.mkdir()
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 4)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct", "peft_type": "LORA", "r": 16})
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        (folder / name).write_text("{}")
    recipe = {
        "model_name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct",
        "tuning_strategy": "qlora",
        "lora_r": 16,
        "dataset_name": "HuggingFaceM4/ChartQA",
        "formatter": "chartqa",
        "system_prompt": "Answer with a single word or number.",
        "learning_rate": 0.0002,
        "output_dir": str(folder),
    }
    (folder / "recipe.yaml").write_text("# recipe: recipes/chartqa.yaml\n" + yaml.safe_dump(recipe, sort_keys=False))
    log = [
        {"loss": 2.5, "step": 10},
        {"loss": 0.7, "step": 200},
        {"eval_loss": 0.8, "step": 200},
        {"eval_chartqa/relaxed_accuracy": 0.61, "eval_chartqa/exact_match": 0.55, "step": 200},
    ]
    (folder / "training_log.json").write_text(json.dumps(log))
    chartqa = {
        "dataset": "HuggingFaceM4/ChartQA",
        "dataset_config": None,
        "split": "test",
        "task": "chartqa",
        "prompt_preset": "lmms_eval",
        "prompt_source": "lmms-eval lmms_eval/tasks/chartqa/chartqa.yaml (default post_prompt)",
        "max_new_tokens": 16,
        "rows": 500,
        "results": {
            "base": {"relaxed_accuracy": 0.42, "relaxed_accuracy_normalized": 0.5, "exact_match": 0.3, "rows": 500},
            "adapter": {
                "relaxed_accuracy": 0.64,
                "relaxed_accuracy_normalized": 0.7,
                "exact_match": 0.58,
                "rows": 500,
            },
        },
    }
    (folder / "eval_results.json").write_text(json.dumps({"base_model": "x", "eval_sets": {"chartqa": chartqa}}))
    (folder / "training_plot.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / "README.md").write_text(PEFT_TEMPLATE)  # PEFT writes this on save: replaced by the real card
    # Left local: checkpoints, optimizer/scheduler states, pickles, predictions.
    (folder / "checkpoint-100").mkdir()
    (folder / "checkpoint-100" / "optimizer.pt").write_bytes(b"x")
    (folder / "checkpoint-100" / "adapter_model.safetensors").write_bytes(b"x")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "predictions_adapter.jsonl"):
        (folder / name).write_bytes(b"x")
    return folder


EXPECTED_FILES = {
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "chat_template.jinja",
    "eval_results.json",
    "processor_config.json",
    "recipe.yaml",
    "tokenizer.json",
    "tokenizer_config.json",
    "training_log.json",
    "training_plot.png",
}


def test_push_sends_the_adapter_processor_card_and_results_only(monkeypatch, output_dir, capsys):
    hub = HubStandIn(license_name="apache-2.0").install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    url = push_main([str(output_dir), "--hub_model_id", "me/qwen-chartqa", "--hub_private_repo", "true"])
    assert url == "https://huggingface.co/me/qwen-chartqa"

    assert hub.repos == [{"repo_id": "me/qwen-chartqa", "private": True, "token": TOKEN, "kwargs": {}}]
    (commit,) = hub.commits
    assert commit["repo_id"] == "me/qwen-chartqa" and commit["token"] == TOKEN
    assert set(commit["files"]) == EXPECTED_FILES  # no checkpoint, optimizer, scheduler, pickle, predictions
    for name, content in commit["files"].items():
        if name == "recipe.yaml":  # `output_dir: <the local folder>`: uploaded as the folder's name alone
            local = (output_dir / name).read_text()
            assert str(output_dir) in local and content.decode() == local.replace(str(output_dir), "run")
        else:
            assert content == (output_dir / name).read_bytes(), name
        assert str(output_dir.parent) not in content.decode(errors="ignore"), name
    assert hub.model_infos == ["Qwen/Qwen2.5-VL-7B-Instruct"]  # the base model's license, and nothing else

    card = commit["files"]["README.md"].decode()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["base_model"] == "Qwen/Qwen2.5-VL-7B-Instruct" and metadata["license"] == "apache-2.0"
    assert metadata["datasets"] == ["HuggingFaceM4/ChartQA"] and metadata["library_name"] == "peft"
    assert "qlora" in metadata["tags"] and CARD_MARKER in card
    assert "| relaxed_accuracy | 0.4200 | 0.6400 |" in card  # evaluation, base and adapter side by side
    assert "| relaxed_accuracy_normalized | 0.5000 | 0.7000 |" in card  # the lenient variant beside it
    assert "prompt preset `lmms_eval` (lmms-eval lmms_eval/tasks/chartqa/chartqa.yaml" in card
    assert "pix2struct" in card  # the task's own text: how the numbers were computed
    assert "training loss: 2.5000 at step 10 -> 0.7000 at step 200" in card
    assert "chartqa/relaxed_accuracy 0.6100" in card
    # model-index: every metric of the adapter, with task, dataset, split and prompt preset, for the Hub to show.
    (index,) = metadata["model-index"]
    (result,) = index["results"]
    assert index["name"] == "qwen-chartqa" and result["task"] == {
        "type": "visual-question-answering",
        "name": "ChartQA",
    }
    assert result["dataset"] == {
        "type": "HuggingFaceM4/ChartQA",
        "name": "HuggingFaceM4/ChartQA (chartqa)",
        "split": "test",
    }
    assert [(m["type"], m["value"], m["args"]["prompt_preset"]) for m in result["metrics"]] == [
        ("relaxed_accuracy", 0.64, "lmms_eval"),
        ("relaxed_accuracy_normalized", 0.7, "lmms_eval"),
        ("exact_match", 0.58, "lmms_eval"),
    ]
    assert 'PeftModel.from_pretrained(base, "me/qwen-chartqa")' in card  # usage snippet
    assert "Answer with a single word or number." in card  # ... with the system prompt it was trained with
    assert "dataset_name: HuggingFaceM4/ChartQA" in card and "learning_rate: 0.0002" in card  # the recipe

    out = capsys.readouterr()
    assert "Local paths replaced by their last part in the upload: recipe.yaml (1)" in out.out
    assert "Kept local (not pushed): checkpoint-100/, optimizer.pt, predictions_adapter.jsonl" in out.out
    for text in [out.out, out.err, card] + [content.decode(errors="ignore") for content in commit["files"].values()]:
        assert TOKEN not in text
    assert all(TOKEN not in path.read_text(errors="ignore") for path in output_dir.rglob("*") if path.is_file())


def test_hub_token_argument_and_a_hand_written_card(monkeypatch, output_dir, no_token, capsys):
    hub = HubStandIn().install(monkeypatch)
    (output_dir / "README.md").write_text("# My own card\n")
    push_main([str(output_dir), "--hub_model_id", "me/run", "--hub_token", TOKEN])
    (commit,) = hub.commits
    assert commit["token"] == TOKEN and hub.repos[0]["private"] is None  # the Hub's default visibility
    assert commit["files"]["README.md"] == b"# My own card\n"  # kept as written
    assert "written by hand" in capsys.readouterr().out


def test_push_without_a_token_says_how_to_get_one(monkeypatch, output_dir, no_token, capsys):
    hub = HubStandIn().install(monkeypatch)
    with pytest.raises(SystemExit) as info:
        push_main([str(output_dir), "--hub_model_id", "me/run"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "needs a Hugging Face token" in err and "hf auth login" in err and "HF_TOKEN" in err
    assert hub.repos == [] and hub.commits == []


@pytest.mark.parametrize(
    "repo_id, message", [(None, "needs `hub_model_id`"), ("not a/valid/repo", "is not a valid repository id")]
)
def test_bad_repository_ids(monkeypatch, repo_id, message):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(RecipeError, match=message):
        hub_target(repo_id)


def test_a_refused_push_keeps_the_outputs_and_says_how_to_retry(monkeypatch, output_dir):
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    HubStandIn().install(monkeypatch)
    response = httpx2.Response(403, request=httpx2.Request("POST", "https://huggingface.co/api/repos/create"))

    def refuse(*args, **kwargs):
        raise HfHubHTTPError("403 Forbidden: you don't have the rights to create a model under this namespace",
                             response=response)  # fmt: skip

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(RecipeError) as info:
        push_output_dir(output_dir, hub_target("someone-else/run", token=TOKEN))
    message = str(info.value)
    assert "403 Forbidden" in message and "lacks write access" in message
    assert f"python -m vlm_recipes.push {output_dir} --hub_model_id someone-else/run" in message
    assert TOKEN not in message and (output_dir / "adapter_model.safetensors").exists()


def test_card_for_a_local_base_model_names_its_license_and_no_hub_metadata(tmp_path, output_dir):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    config = json.loads((output_dir / "adapter_config.json").read_text())
    (output_dir / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    (output_dir / "eval_results.json").unlink()
    facts = SavedRun.read(output_dir)
    from vlm_recipes.hub.license import base_model_license

    card = model_card(facts, "me/run", base_model_license(str(base)))
    metadata = yaml.safe_load(card.split("---")[1])
    assert "base_model" not in metadata  # a local path is not a Hub id; the Hub would reject it
    assert metadata["license"] == "mit" and "License: `mit`" in card
    assert "Not evaluated yet: `vlm-recipes evaluate RECIPE.yaml --adapter DIR`" in card
    # Not evaluated by the command: model-index holds the last evaluation during training, and says so.
    (result,) = metadata["model-index"][0]["results"]
    assert result["dataset"]["type"] == "HuggingFaceM4/ChartQA" and result["dataset"]["split"] == "test"
    assert [(m["type"], m["value"]) for m in result["metrics"]] == [("relaxed_accuracy", 0.61), ("exact_match", 0.55)]
    assert result["metrics"][0]["args"] == {"prompt_preset": "recipe", "during_training_at_step": 200}


def test_card_reduces_relative_local_paths_like_absolute_ones(output_dir):
    """A recipe run from the repository names its model and data relative to it (`.cache/tiny/...`): the card shows
    their last part only, as it does absolute paths."""
    config = json.loads((output_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = ".cache/tiny/qwen2_5_vl"
    (output_dir / "adapter_config.json").write_text(json.dumps(config))
    recipe = yaml.safe_load((output_dir / "recipe.yaml").read_text())
    recipe.update(dataset_name="./data/chartqa_synthetic", model_name_or_path=".cache/tiny/qwen2_5_vl")
    (output_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    card = model_card(SavedRun.read(output_dir), "me/run", None)
    assert ".cache/" not in card and "./data" not in card
    assert "`qwen2_5_vl`" in card and "`chartqa_synthetic`" in card


def test_model_index_names_local_data_without_its_path_and_skips_results_of_another_model(tmp_path, output_dir):
    results = json.loads((output_dir / "eval_results.json").read_text())
    local = tmp_path / "my_documents"
    local.mkdir()
    docs = {**results["eval_sets"]["chartqa"], "dataset": str(local), "task": "docvqa", "prompt_preset": "recipe"}
    docs["results"] = {"base": {"anls": 0.5, "rows": 500}, "adapter": {"anls": 0.75, "rows": 500}}
    results["eval_sets"]["docs"] = docs
    (output_dir / "eval_results.json").write_text(json.dumps(results))
    card = model_card(SavedRun.read(output_dir), "me/run", None)
    metadata = yaml.safe_load(card.split("---")[1])
    docs_result = metadata["model-index"][0]["results"][1]
    assert docs_result["task"]["type"] == "document-question-answering"
    assert docs_result["dataset"] == {"type": "docs", "name": "my_documents (docs)", "split": "test"}
    assert docs_result["metrics"] == [
        {"type": "anls", "name": "anls", "value": 0.75, "args": {"prompt_preset": "recipe", "rows": 500}}
    ]
    assert str(local) not in card and "| anls | 0.5000 | 0.7500 |" in card

    # Only the base was evaluated: those are not this adapter's numbers, so model-index does not claim them.
    for result in results["eval_sets"].values():
        del result["results"]["adapter"]
    (output_dir / "eval_results.json").write_text(json.dumps(results))
    metadata = yaml.safe_load(model_card(SavedRun.read(output_dir), "me/run", None).split("---")[1])
    assert [r["dataset"]["type"] for r in metadata["model-index"][0]["results"]] == ["HuggingFaceM4/ChartQA"]
    assert metadata["model-index"][0]["results"][0]["metrics"][0]["args"]["during_training_at_step"] == 200


def test_training_that_would_push_without_a_token_stops_before_it_starts(
    no_token, tiny_qwen, chartqa_dir, tmp_path, capsys
):
    from conftest import REPO_ROOT

    from vlm_recipes.sft import main

    output_dir = tmp_path / "never"
    with pytest.raises(SystemExit) as info:
        main(
            [
                str(REPO_ROOT / "recipes" / "demo" / "sft_lora.yaml"),
                "--model_name_or_path", str(tiny_qwen), "--dataset_name", str(chartqa_dir),
                "--output_dir", str(output_dir), "--push_to_hub", "true", "--hub_model_id", "me/run",
            ]
        )  # fmt: skip
    assert info.value.code == 2
    assert "needs a Hugging Face token" in capsys.readouterr().err
    assert not output_dir.exists()  # nothing loaded, nothing trained


def test_a_training_run_writes_the_hub_token_nowhere(monkeypatch, no_token, tiny_qwen, chartqa_dir, tmp_path, capsys):
    """The Trainer pickles its arguments into every checkpoint (`training_args.bin`): the token must not be among them.
    It reaches the Hub (the stand-in) and nothing else: no file of the run, no line printed."""
    from conftest import REPO_ROOT

    from vlm_recipes.sft import main

    hub = HubStandIn().install(monkeypatch)
    output_dir = tmp_path / "run"
    main(
        [
            str(REPO_ROOT / "recipes" / "demo" / "sft_lora.yaml"),
            "--model_name_or_path", str(tiny_qwen), "--dataset_name", str(chartqa_dir),
            "--output_dir", str(output_dir), "--max_train_samples", "4", "--per_device_train_batch_size", "2",
            "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1",
            "--push_to_hub", "true", "--hub_model_id", "me/run", "--hub_token", TOKEN,
        ]
    )  # fmt: skip
    (commit,) = hub.commits
    assert commit["token"] == TOKEN and hub.repos[0]["token"] == TOKEN  # the push still has it
    assert (output_dir / "checkpoint-1" / "training_args.bin").is_file()  # pickled arguments were written...
    written = [path for path in output_dir.rglob("*") if path.is_file()]
    assert [path for path in written if TOKEN.encode() in path.read_bytes()] == []  # ...and hold no token
    out = capsys.readouterr()
    assert TOKEN not in out.out and TOKEN not in out.err


def test_a_dpo_run_on_a_merged_sft_adapter_pushes_it_and_its_card_says_how_to_load_and_evaluate(
    monkeypatch, output_dir, capsys
):
    hub = HubStandIn().install(monkeypatch)
    # The folder of a DPO run with `reference: sft_merged`: the DPO adapter, and the SFT adapter it sits on.
    recipe = {
        "model_name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct",
        "tuning_strategy": "lora",
        "sft_adapter_path": "outputs/sft",
        "reference": "sft_merged",
        "dataset_name": "openbmb/RLAIF-V-Dataset",
        "formatter": "rlaif_v",
    }
    (output_dir / "recipe.yaml").write_text(
        "# entry point: vlm_recipes.dpo\n# recipe: recipes/rlaif_v.yaml\n" + yaml.safe_dump(recipe, sort_keys=False)
    )
    (output_dir / "eval_results.json").unlink()
    sft = output_dir / "sft_adapter"
    sft.mkdir()
    save_file({"base_model.model.lm_head.lora_B.weight": torch.ones(4, 2)}, str(sft / "adapter_model.safetensors"))
    (sft / "adapter_config.json").write_text((output_dir / "adapter_config.json").read_text())
    (sft / "README.md").write_text(PEFT_TEMPLATE)  # not on the allow-list, in a subfolder too
    (sft / "training_args.bin").write_bytes(b"x")

    push_output_dir(output_dir, hub_target("me/dpo", token=TOKEN))
    (commit,) = hub.commits
    pushed_sft = {name for name in commit["files"] if name.startswith("sft_adapter/")}
    assert pushed_sft == {"sft_adapter/adapter_model.safetensors", "sft_adapter/adapter_config.json"}
    for name in pushed_sft:
        assert commit["files"][name] == (output_dir / name).read_bytes()
    assert "sft_adapter/README.md, sft_adapter/training_args.bin" in capsys.readouterr().out  # kept local

    card = commit["files"]["README.md"].decode()
    merge_sft = 'base = PeftModel.from_pretrained(base, "me/dpo", subfolder="sft_adapter").merge_and_unload()'
    assert merge_sft in card and card.index(merge_sft) < card.index(
        'model = PeftModel.from_pretrained(base, "me/dpo")'
    )
    evaluate = (
        "vlm-recipes evaluate recipes/chartqa.yaml --model_name_or_path Qwen/Qwen2.5-VL-7B-Instruct "
        "--tuning_strategy lora --adapter DIR"
    )
    assert evaluate in card and "not this DPO recipe" in card and "RECIPE.yaml" not in card
    assert "base + the SFT adapter, the model DPO started from" in card

    # A QLoRA DPO adapter on the base alone: evaluated in 4 bit, as it trained; no SFT merge step.
    shutil.rmtree(sft)
    (output_dir / "recipe.yaml").write_text(
        "# entry point: vlm_recipes.dpo\n" + yaml.safe_dump({**recipe, "tuning_strategy": "qlora"}, sort_keys=False)
    )
    card = model_card(SavedRun.read(output_dir), "me/dpo", None)
    assert "--tuning_strategy qlora --adapter DIR" in card and "subfolder" not in card


RUN_INFO = {
    "processes": 2,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 8,
    "global_batch": 64,
    "learning_rate": 0.0002,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,
    "precision": "bf16 mixed precision, 4-bit NF4 base",
    "steps": 200,
    "epochs": 1.5,
    "train_runtime_seconds": 5400.0,
    "hardware": "2 x NVIDIA H100 80GB HBM3",
    "framework_versions": {"python": "3.11.7", "trl": "1.16.0", "transformers": "5.24.0"},
}


def test_card_has_training_details_versions_and_intended_use(output_dir):
    (output_dir / "run_info.json").write_text(json.dumps(RUN_INFO))
    card = model_card(SavedRun.read(output_dir), "me/qwen-chartqa", "apache-2.0")
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["pipeline_tag"] == "image-text-to-text" and metadata["library_name"] == "peft"
    assert "- global batch: 64 = 4 per device x 8 accumulation steps x 2 process(es)" in card
    assert "- schedule: `cosine` from learning rate 0.0002, warmup 0.03 (a fraction of the steps)" in card
    assert "- precision: bf16 mixed precision, 4-bit NF4 base" in card and "- steps: 200 (1.5 epochs)" in card
    assert "- wall time: 90.0 min (5400 s) on 2 x NVIDIA H100 80GB HBM3" in card
    assert "## Framework versions" in card and "- trl: 1.16.0" in card
    assert "## Intended use and limitations" in card and "`HuggingFaceM4/ChartQA`" in card
    # Without run_info.json (a run of an older version), the card leaves the details out instead of guessing.
    (output_dir / "run_info.json").unlink()
    older = model_card(SavedRun.read(output_dir), "me/qwen-chartqa", None)
    assert "global batch" not in older and "## Framework versions" not in older


def test_push_dry_run_shows_offline_exactly_what_a_push_uploads(monkeypatch, output_dir, no_token, tmp_path, capsys):
    hub = HubStandIn(license_name="apache-2.0").install(monkeypatch)
    (output_dir / "eval_results.json").write_text(
        (output_dir / "eval_results.json").read_text().replace('"x"', json.dumps(str(tmp_path / "models" / "base")))
    )
    preview = tmp_path / "preview"
    push_main([str(output_dir), "--hub_model_id", "me/qwen-chartqa", "--dry_run", "--dry_run_dir", str(preview)])
    assert hub.repos == [] and hub.commits == []  # no token needed, nothing sent
    out = capsys.readouterr().out
    assert "a push to me/qwen-chartqa would upload 11 files" in out and "adapter_model.safetensors (" in out
    assert "eval_results.json (1), recipe.yaml (1)" in out  # the scrubbed files, with how many paths each lost
    previewed = {str(path.relative_to(preview)): path.read_bytes() for path in preview.rglob("*") if path.is_file()}
    assert set(previewed) == EXPECTED_FILES
    assert all(str(tmp_path) not in content.decode(errors="ignore") for content in previewed.values())
    assert json.loads(previewed["eval_results.json"])["base_model"] == "base"

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push_main([str(output_dir), "--hub_model_id", "me/qwen-chartqa"])
    (commit,) = hub.commits
    assert commit["files"] == previewed  # the dry run showed exactly what the push uploaded
