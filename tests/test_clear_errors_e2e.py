"""Inputs that used to end in a Python traceback end in one message naming the file, the line (or row) and the field,
through the real entry points. Each stops before any weights load, so most run in this process (`main(argv)`, the
same function `python -m` runs, with its `exit_on_recipe_error`; conftest.run_in_process), where argparse's usage text
would show on stderr too."""

import json

import pytest
from conftest import REPO_ROOT, assert_clear_error, run_in_process
from PIL import Image

from vlm_recipes import chat, preflight, sft


pytestmark = pytest.mark.e2e

RECIPE = str(REPO_ROOT / "recipes" / "demo" / "sft_lora.yaml")


def args(model, data, output_dir, *extra):
    return [RECIPE, "--model_name_or_path", model, "--dataset_name", data, "--output_dir", output_dir,
            "--dataset_test_split", "none", "--formatter", "conversations", *extra]  # fmt: skip


def stops(capsys, main, argv) -> str:
    """The entry point exits with 2 and one `error:` message without a traceback; returns the message."""
    with pytest.raises(SystemExit) as info:
        main([str(arg) for arg in argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err
    return err[err.rfind("error:") :]


@pytest.fixture
def conversations(tmp_path):
    Image.new("RGB", (56, 56), "red").save(tmp_path / "a.png")
    row = {"messages": [{"role": "user", "content": "<image>Which colour?"}, {"role": "assistant", "content": "Red"}],
           "images": ["a.png"]}  # fmt: skip
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("main", [sft.main, preflight.main], ids=["sft", "preflight"])
def test_a_jsonl_with_bytes_that_are_not_utf8_names_the_line(capsys, tiny_qwen, conversations, tmp_path, main):
    good = conversations.read_bytes()
    conversations.write_bytes(good + good.replace(b"Red", b"Rouge \xe9carlate"))  # Latin-1, not UTF-8
    message = stops(capsys, main, args(tiny_qwen, conversations, tmp_path / "out"))
    assert f"{conversations}, line 2: is not valid UTF-8 (byte 0xe9" in message


def test_a_model_folder_with_custom_code_names_the_option(capsys, conversations, tmp_path):
    model = tmp_path / "custom-model"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({"model_type": "my_vlm", "auto_map": {"AutoConfig": "configuration_my_vlm.MyConfig"}})
    )
    (model / "configuration_my_vlm.py").write_text("raise SystemExit('this code must never run')\n")
    message = stops(capsys, sft.main, args(model, conversations, tmp_path / "out"))
    assert "holds custom model code (configuration_my_vlm.py" in message
    assert "`trust_remote_code: true`" in message and "executes Python files" in message


@pytest.mark.parametrize(
    "model, expected",
    [
        ("./no/such/model-folder", "the folder ./no/such/model-folder does not exist"),
        ("no-such-org/no-such-model", "the Hub cannot be reached offline"),
    ],
)
def test_a_model_path_that_does_not_exist_says_so(capsys, conversations, tmp_path, model, expected):
    message = stops(capsys, sft.main, args(model, conversations, tmp_path / "out"))
    assert expected in message and "Repo id must be" not in message


def test_a_logger_that_is_not_installed_is_named_at_start_with_its_extra(
    capsys, tiny_qwen, conversations, tmp_path, monkeypatch
):
    import transformers.integrations as integrations

    monkeypatch.setattr(integrations, "is_tensorboard_available", lambda: False)  # make install installs it
    message = stops(capsys, sft.main, args(tiny_qwen, conversations, tmp_path / "out", "--report_to", "tensorboard"))
    assert "report_to: tensorboard needs the tensorboard package" in message
    assert "pip install 'vlm-recipes[tensorboard]'" in message
    assert not (tmp_path / "out").exists()  # at start: no output folder, no data checks


@pytest.mark.parametrize(
    "setting, expected",
    [
        (["--max_steps", "-5"], "max_steps: -5 is not a length of training"),
        (["--max_steps", "0"], "max_steps: 0 is not a length of training"),
        (["--num_train_epochs", "0", "--max_steps", "-1"], "num_train_epochs: 0.0 would train nothing"),
    ],
)
def test_a_training_length_that_trains_nothing_is_refused(
    capsys, tiny_qwen, conversations, tmp_path, setting, expected
):
    message = stops(capsys, sft.main, args(tiny_qwen, conversations, tmp_path / "out", *setting))
    assert expected in message
    assert not (tmp_path / "out").exists()


def test_chat_on_an_image_past_the_decompression_limit(capsys, tiny_qwen, tmp_path):
    huge = tmp_path / "huge.png"
    Image.new("1", (14000, 13000)).save(huge)  # 182 million pixels: over PIL's 2 x 89.5 million limit, 22 kB on disk
    message = stops(capsys, chat.main, ["--model", tiny_qwen, "--image", huge, "--question", "What is it?"])
    assert f"--image {huge}: the image is too large to decode safely" in message


def test_a_wrong_type_in_a_recipe_is_one_line_naming_file_field_value_and_type(tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("model_name_or_path: some/model\ndataset_name: data.jsonl\nlearning_rate: abc\n")
    result = run_in_process("vlm_recipes.sft", recipe, capsys=capsys)
    assert_clear_error(result, f"{recipe}: field 'learning_rate' is 'abc', which is not a number.")
    assert "usage:" not in result.stderr and len(result.stderr.strip().splitlines()) <= 3


def test_a_wrong_type_on_the_command_line_is_one_line(capsys):
    message = stops(capsys, sft.main, ["--max_steps", "ten"])
    assert "command line: argument --max_steps" in message and "invalid int value: 'ten'" in message


@pytest.mark.parametrize(
    "line, expected",
    [
        ("max_steps: 1.5", "field 'max_steps' is 1.5, which is not a whole number"),
        ("learning_rate: [0.1]", "field 'learning_rate' is [0.1], which is not a number"),
        ("bf16: maybe", "field 'bf16' is 'maybe', which is not true or false"),
        ("dtype: float64", "field 'dtype' is 'float64', which is not one of auto, bfloat16, float16, float32"),
    ],
)
def test_wrong_types_in_a_recipe_file(capsys, tmp_path, line, expected):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(f"model_name_or_path: some/model\n{line}\n")
    assert f"{recipe}: {expected}." in stops(capsys, sft.main, [recipe])
