"""Shared fixtures: tiny models and generated data are built once per test session; entry points run in subprocesses
(`run_module`) or in this process (`run_in_process`)."""

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO_ROOT = Path(__file__).resolve().parents[1]
SRC = REPO_ROOT / "src"
TEST_DATA = Path(__file__).resolve().parent / "data"

# Subprocesses import this checkout's package (also from a git worktree), offline, without tokenizer fork warnings.
os.environ["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A function: family name -> folder of that family's tiny model, built on first use in this session."""
    from vlm_recipes.testing.tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_model(family, root / family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_qwen(tiny_models) -> Path:
    return tiny_models("qwen2_5_vl")


@pytest.fixture(scope="session")
def chartqa_dir(tmp_path_factory) -> Path:
    """A generated ChartQA-shaped dataset folder (parquet, train and test splits)."""
    from vlm_recipes.data.synthetic import save_chartqa_dataset

    return save_chartqa_dataset(tmp_path_factory.mktemp("chartqa"), train_rows=48, test_rows=16, seed=0)


@pytest.fixture(scope="session")
def task_datasets(tmp_path_factory) -> dict[str, Path]:
    """Generated evaluation data of the other tasks, in their Hub schemas (a few rows each): dataset folders for
    docvqa, textvqa and scienceqa (multiple choice), and `conversations`, a JSONL file of the user's own kind (chart
    images as PNG files beside it, conversations in the `messages` style)."""
    from vlm_recipes.data.synthetic import make_chartqa_rows, save_generated_dataset

    root = tmp_path_factory.mktemp("tasks")
    folders = {
        schema: save_generated_dataset(root / schema, schema, train_rows=4, test_rows=4, seed=3)
        for schema in ("docvqa", "textvqa", "scienceqa")
    }
    (root / "own" / "charts").mkdir(parents=True)
    lines = []
    for index, row in enumerate(make_chartqa_rows(4, seed=5)):
        row["image"].save(root / "own" / "charts" / f"{index}.png")
        turns = [
            {"role": "user", "content": f"<image>{row['query']}"},
            {"role": "assistant", "content": row["label"][0]},
        ]
        lines.append(json.dumps({"messages": turns, "images": [f"charts/{index}.png"]}))
    (root / "own" / "conversations.jsonl").write_text("\n".join(lines) + "\n")
    return {**folders, "conversations": root / "own" / "conversations.jsonl"}


@pytest.fixture(scope="session")
def chartqa_human_rows() -> list[dict]:
    """28 real question/answer rows of the ChartQA test split (images not included)."""
    lines = (TEST_DATA / "chartqa_test_human_sample.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def run_module(module: str, *args: str, cwd: Path = REPO_ROOT, timeout: int = 600, env: dict | None = None):
    """Run `python -m module args...` as a user would; returns the CompletedProcess (stdout and stderr as text)."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


class _CurrentStderr(logging.StreamHandler):
    """Writes each record to `sys.stderr` as it is at that moment (a capture's), where a subprocess's logging writes.
    A handler made earlier holds the stream of its time; under pytest, `logging.basicConfig` adds none (pytest's own
    handlers are on the root logger), so without this the package's log messages would reach no captured stderr."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))  # console.setup_console's format

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):  # StreamHandler.__init__ sets it; the stream is always the current stderr
        pass


def run_in_process(module: str, *args: str, capsys=None) -> subprocess.CompletedProcess:
    """Run an entry point's `main(argv)` in this process, as `python -m module args...` would run it, and return what a
    subprocess would (exit code, stdout, stderr with the package's log messages) - without paying for a new
    interpreter's imports (~10 s on 2 cores). For the runs whose subject is the command's behaviour, not the process
    (a kill, several processes). `capsys`: a test's capture; without one (a module-scoped fixture cannot take it),
    stdout and stderr are redirected into strings for the run."""
    import importlib
    import traceback

    main = importlib.import_module(module).main
    argv = [str(arg) for arg in args]

    def exit_code() -> int:
        handler, package_logger = _CurrentStderr(), logging.getLogger("vlm_recipes")
        package_logger.addHandler(handler)
        try:
            main(argv)
            return 0
        except SystemExit as stop:
            return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except Exception:  # an unexpected error: a traceback on stderr and exit code 1, as the interpreter does
            traceback.print_exc()
            return 1
        finally:
            package_logger.removeHandler(handler)

    if capsys is not None:
        capsys.readouterr()  # what earlier steps of the test printed is not this command's output
        returncode = exit_code()
        out, err = capsys.readouterr()
    else:
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            returncode = exit_code()
        out, err = stdout.getvalue(), stderr.getvalue()
    return subprocess.CompletedProcess([module, *argv], returncode, out, err)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\nSTDERR:\n{result.stderr[-6000:]}"
    )


def console_log_lines(console: str, start: str = "step ") -> list[str]:
    """The lines a run printed for its logs (`step N/M  loss 1.2  ...`; an evaluation's: start="eval step ")."""
    lines = (line.strip() for line in console.replace("\r", "\n").splitlines())
    return [line for line in lines if line.startswith(start)]


def shown_keys(line: str) -> list[str]:
    """The keys a log line shows, in its order: `step 3/4  loss 1.2  learning_rate 5e-05` -> [loss, learning_rate]."""
    return [part.split(" ")[0] for part in line.split("  ")[1:]]


def logged_losses(output_dir):
    """The training losses an entry point logged in its output folder's training_log.json."""
    log = json.loads((Path(output_dir) / "training_log.json").read_text())
    return [entry["loss"] for entry in log if "loss" in entry]


def assert_clear_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user error: exit code 2, one `error:` message holding every fragment, and no Python traceback."""
    assert result.returncode == 2, f"exit {result.returncode}\nSTDERR:\n{result.stderr[-6000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-6000:]
    message = result.stderr[result.stderr.rfind("error:") :]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# ---------------------------------------------------------------------------------------------------------------------
# Building a trainer in process (no subprocess), and reading its collated labels


def trainer_for(model_dir, dataset, output_dir, *extra):
    """The SFT trainer `vlm_recipes.sft` would build for this model and data (16-bit LoRA, fp32, CPU)."""
    from vlm_recipes.recipe import parse_recipe
    from vlm_recipes.sft import SFTRecipe, build_trainer

    recipe = parse_recipe(
        SFTRecipe,
        [
            "--model_name_or_path", str(model_dir), "--dataset_name", str(dataset), "--output_dir", str(output_dir),
            "--use_peft", "true", "--use_cpu", "true", "--bf16", "false", "--dtype", "float32", "--report_to", "none",
            "--lora_dropout", "0",  # also what LoRA on fused MoE experts needs
            *map(str, extra),
        ],
    )  # fmt: skip
    return build_trainer(recipe)


def checkpoint_as_trainer(trainer) -> None:
    """Gradient checkpointing switched on as `Trainer.train` does before its first step (TRL's arguments), for tests
    that run a step of a built trainer outside `train`."""
    kwargs = dict(trainer.args.activation_checkpointing_kwargs or {})
    trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)


def labelled_spans(labels):
    """Contiguous runs of labelled positions, as lists of token ids."""
    spans, current = [], []
    for token in labels.tolist():
        if token == -100:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(token)
    return spans + ([current] if current else [])


# Under `pytest -n` (`make test`: `-n 2 --dist loadscope`): a file's tests run on one worker, one after the other, so
# its module fixtures (the DDP and ZeRO runs, the families' training runs, the e2e runs several tests read) run once;
# the files below hold many independent tests and are spread test by test so that both workers finish together.
# A scheduler of our own rather than `xdist_group` marks: xdist 3.8 writes a group into `item._nodeid`, which pytest 9
# no longer reads (the marks were silently ignored and every module fixture ran on both workers).
SPREAD_OVER_WORKERS = {"test_strategies.py", "test_task_metrics.py", "test_properties.py"}


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        """Each test file is one unit of work, except the SPREAD_OVER_WORKERS files, whose tests are one unit each."""

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return nodeid if Path(path).name in SPREAD_OVER_WORKERS else path

    return FileScheduling(config, log)
