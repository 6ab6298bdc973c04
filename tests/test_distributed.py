"""The same recipe on several processes, on CPU and offline: DDP, DeepSpeed ZeRO-2 and ZeRO-3, FSDP, two machines.

How the runs start, and why: each is the README's command with the shipped accelerate config,

    accelerate launch --config_file accelerate_configs/<config>.yaml --num_processes 2 --mixed_precision no \\
        -m vlm_recipes.sft recipes/demo/sft_lora.yaml ...

`accelerate launch --cpu --num_processes 2` would start ONE process; a MULTI_GPU or DEEPSPEED config on a machine without
GPUs starts two (torchrun underneath), which train on CPU over gloo because the recipe parser turns `use_cpu` on when
there is no GPU. `--num_processes 2` fits the 2-core test machine instead of the configs' 8 GPUs; `--mixed_precision no`
with `--dtype float32 --bf16 false` keeps the arithmetic exact enough to compare with one process. The one-process
reference runs the entry point's main in the test process (what `single_gpu.yaml` launches).

Every run here is a few steps of the tiny model; the runs are module fixtures that several tests read.
"""

import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, assert_ok

from vlm_recipes.training.distributed import TEXT_ONLY_REASON


pytestmark = pytest.mark.e2e

CONFIGS = REPO_ROOT / "accelerate_configs"
DEMO_RECIPE = REPO_ROOT / "recipes" / "demo" / "sft_lora.yaml"
STEPS = 4
GLOBAL_BATCH = 4
EVAL_GENERATION_ROWS = 5  # odd: one process gets a padded share
PLANTED_ROWS = (0, 2, 4)  # evaluation rows whose label is set to the untrained model's own answer
EVAL_ARGS = [
    "--eval_strategy", "steps", "--eval_steps", STEPS, "--eval_on_start", "true", "--max_eval_samples", 6,
    "--per_device_eval_batch_size", 1, "--eval_generation_rows", EVAL_GENERATION_ROWS,
    "--eval_generation_batch_size", 1, "--max_new_tokens", 3,
]  # fmt: skip
GPU_COUNT = torch.cuda.device_count()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def recipe_args(model, data, output_dir, processes, *extra):
    return [
        DEMO_RECIPE, "--model_name_or_path", model, "--dataset_name", data, "--output_dir", output_dir,
        "--overwrite_output_dir", "false", "--dtype", "float32", "--bf16", "false", "--max_train_samples", 16,
        "--max_steps", STEPS, "--logging_steps", 1, "--gradient_accumulation_steps", 1,
        "--per_device_train_batch_size", GLOBAL_BATCH // processes, *extra,
    ]  # fmt: skip


def accelerate_launch(config, *args, processes=2, module="vlm_recipes.sft", env=None, timeout=420):
    """`accelerate launch --config_file accelerate_configs/CONFIG ...` as a user types it (see the module docstring)."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIGS / config,
        "--num_processes", processes, "--mixed_precision", "no", "--main_process_port", free_port(),
        "-m", module, *args,
    ]  # fmt: skip
    return subprocess.run(
        [str(part) for part in command],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def training_log(output_dir):
    return json.loads((output_dir / "training_log.json").read_text())


def per_step(log, key):
    return {entry["step"]: entry[key] for entry in log if key in entry}


def assert_same_losses(run_dir, reference_dir):
    """The loss (and gradient norm) at every step equals the one-process run on the same global batch."""
    mine, theirs = training_log(run_dir), training_log(reference_dir)
    for key in ("loss", "grad_norm"):
        assert per_step(mine, key).keys() == per_step(theirs, key).keys() == set(range(1, STEPS + 1))
        for step, value in per_step(theirs, key).items():
            assert per_step(mine, key)[step] == pytest.approx(value, rel=1e-4), (key, step)


def step_zero_metrics(output_dir):
    keys = ("eval_chartqa/relaxed_accuracy", "eval_chartqa/relaxed_accuracy_normalized", "eval_chartqa/exact_match")
    return {key: per_step(training_log(output_dir), key)[0] for key in keys}


# ---------------------------------------------------------------------------------------------------------------------
# Data with a known evaluation score, the one-process reference, and the two-process runs


@pytest.fixture(scope="module")
def planted_data(tiny_qwen, chartqa_dir, tmp_path_factory):
    """The generated ChartQA data, with the labels of evaluation rows 0, 2 and 4 replaced by the answers the untrained
    model gives (generated the way evaluation during training generates them): the score at step 0 is then known to
    be above zero, so gathering the wrong rows or the wrong order would change it."""
    from datasets import load_dataset

    from vlm_recipes import sft
    from vlm_recipes.evaluation.runner import evaluate_rows
    from vlm_recipes.recipe import parse_recipe
    from vlm_recipes.tasks import get_task

    root = tmp_path_factory.mktemp("planted")
    args = recipe_args(tiny_qwen, chartqa_dir, root / "probe", 1, *EVAL_ARGS)
    recipe = parse_recipe(sft.SFTRecipe, [str(a) for a in args])
    trainer = sft.build_trainer(recipe)
    rows = trainer.eval_dataset.select(range(EVAL_GENERATION_ROWS))
    chartqa = get_task("chartqa")
    answers = [record["prediction"] for record in evaluate_rows(
        trainer.model, trainer.processing_class, rows, chartqa, chartqa.preset("recipe"), batch_size=1,
        max_new_tokens=3, progress=False,
    ).records]  # fmt: skip
    assert all(answers[i].strip() for i in PLANTED_ROWS), answers

    splits = load_dataset(str(chartqa_dir))
    test = splits["test"].map(
        lambda row, index: {"label": [answers[index]] if index in PLANTED_ROWS else row["label"]}, with_indices=True
    )
    (root / "data" / "data").mkdir(parents=True)
    splits["train"].to_parquet(str(root / "data" / "data" / "train-00000-of-00001.parquet"))
    test.to_parquet(str(root / "data" / "data" / "test-00000-of-00001.parquet"))
    return root / "data"


@pytest.fixture(scope="module")
def reference(tiny_qwen, planted_data, tmp_path_factory):
    """One process, batch 4: the entry point's main in this process (what `single_gpu.yaml` launches, without a new
    interpreter's imports)."""
    from vlm_recipes import sft

    output_dir = tmp_path_factory.mktemp("reference") / "run"
    sft.main([str(arg) for arg in recipe_args(tiny_qwen, planted_data, output_dir, 1, *EVAL_ARGS)])
    return output_dir


@pytest.fixture(scope="module")
def ddp_run(tiny_qwen, planted_data, tmp_path_factory):
    """Two processes, batch 2 each (multi_gpu.yaml). A fresh datasets cache with its log on, to see who formatted."""
    root = tmp_path_factory.mktemp("ddp")
    result = accelerate_launch(
        "multi_gpu.yaml",
        *recipe_args(tiny_qwen, planted_data, root / "run", 2, *EVAL_ARGS),
        env={"HF_DATASETS_CACHE": str(root / "datasets_cache"), "DATASETS_VERBOSITY": "info"},
    )
    assert_ok(result)
    return root / "run", result


def test_two_processes_train_like_one(ddp_run, reference):
    output_dir, _ = ddp_run
    assert_same_losses(output_dir, reference)


def assert_outputs_written_once(output_dir):
    """One adapter, one data report, one plot, one recipe: the main process's, and nothing per process."""
    for name in ("adapter_model.safetensors", "data_report.json", "training_plot.png", "recipe.yaml"):
        assert [path.name for path in output_dir.rglob(name)] == [name], name
    assert not [path for path in output_dir.rglob("*") if re.search(r"rank|process_?\d", path.name)]


def test_work_that_should_happen_once_happens_once(ddp_run, reference):
    output_dir, result = ddp_run
    assert_outputs_written_once(output_dir)
    report = json.loads((output_dir / "data_report.json").read_text())
    assert report == json.loads((reference / "data_report.json").read_text())
    assert result.stdout.count("Outputs in ") == 1 and result.stdout.count("Tuning strategy 'lora'") == 1

    # The main process loaded and formatted the data, writing the datasets cache; the other waited, then loaded every
    # one of those files instead of formatting again.
    written = re.findall(r"INFO datasets\.arrow_dataset: Caching processed dataset at (\S+)\.arrow", result.stderr)
    reused = re.findall(
        r"INFO datasets\.arrow_dataset: Loading cached processed dataset at (\S+)_\*_of_\d+\.arrow", result.stderr
    )
    assert len(written) >= 4 and len(set(written)) == len(written), written  # each file written once
    assert sorted(reused) == sorted(written)


def test_evaluation_metrics_equal_the_single_process_ones(ddp_run, reference):
    output_dir, _ = ddp_run
    expected = step_zero_metrics(reference)
    assert (
        expected["eval_chartqa/exact_match"] >= len(PLANTED_ROWS) / EVAL_GENERATION_ROWS
    )  # the planted answers count
    assert step_zero_metrics(output_dir) == expected
    for step, value in per_step(training_log(reference), "eval_loss").items():
        assert per_step(training_log(output_dir), "eval_loss")[step] == pytest.approx(value, rel=1e-4)


def test_ddp_reduces_only_trained_weights_and_skips_the_unused_search(ddp_run):
    _, result = ddp_run
    assert (
        f"Launch: DDP over 2 processes on 1 machine(s) (gloo); global batch {GLOBAL_BATCH} = 2 per device x 1 "
        "accumulation step(s) x 2 process(es)" in result.stdout
    )
    assert (
        "DDP reduces the gradients of: language model 28 tensors (32,768 parameters); not reduced (frozen): vision "
        "tower, projector; find_unused_parameters: false" in result.stdout
    )
    assert "find_unused_parameters=True was specified" not in result.stderr  # TRL's default for VLMs: a slow search


# ---------------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-2 and ZeRO-3, FSDP


@pytest.fixture(scope="module")
def zero3_run(tiny_qwen, planted_data, tmp_path_factory):
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed (`make install` installs it)")
    output_dir = tmp_path_factory.mktemp("zero3") / "run"
    result = accelerate_launch("zero3.yaml", *recipe_args(tiny_qwen, planted_data, output_dir, 2, *EVAL_ARGS))
    assert_ok(result)
    return output_dir, result


@pytest.mark.extended  # ZeRO-3 below covers the sharded path in make test
def test_zero2_trains_like_one_process(tiny_qwen, planted_data, reference, tmp_path):
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed (`make install` installs it)")
    result = accelerate_launch("zero2.yaml", *recipe_args(tiny_qwen, planted_data, tmp_path / "run", 2))
    assert_ok(result)
    assert "Launch: DeepSpeed ZeRO-2 over 2 processes" in result.stdout
    assert_same_losses(tmp_path / "run", reference)
    assert_outputs_written_once(tmp_path / "run")


def test_zero3_trains_and_evaluates_like_one_process(zero3_run, reference):
    output_dir, result = zero3_run
    assert "Launch: DeepSpeed ZeRO-3 over 2 processes" in result.stdout
    assert_same_losses(output_dir, reference)
    assert_outputs_written_once(output_dir)
    # Generation under ZeRO-3: both processes step through generation together (their shares padded to one length)
    assert step_zero_metrics(output_dir) == step_zero_metrics(reference)


def logits_with_adapter(base_dir, adapter_dir, inputs):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, adapter_dir).eval()(**inputs).logits


def test_zero3_adapter_is_complete_and_matches_the_unsharded_one(zero3_run, reference, tiny_qwen):
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoProcessor

    output_dir, _ = zero3_run
    sharded, unsharded = (load_file(path / "adapter_model.safetensors") for path in (output_dir, reference))
    assert sharded.keys() == unsharded.keys() and len(sharded) == 28
    assert all(tensor.numel() > 0 for tensor in sharded.values())
    for key, tensor in unsharded.items():
        assert sharded[key].shape == tensor.shape
        torch.testing.assert_close(sharded[key], tensor, rtol=1e-3, atol=1e-4)

    processor = AutoProcessor.from_pretrained(output_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many bars?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[Image.new("RGB", (96, 64), "white")], return_tensors="pt")
    torch.testing.assert_close(
        logits_with_adapter(tiny_qwen, output_dir, inputs),
        logits_with_adapter(tiny_qwen, reference, inputs),
        rtol=1e-3,
        atol=1e-4,
    )


@pytest.mark.extended  # ZeRO-3 DPO from an SFT adapter (~75 s); ZeRO-3 SFT stays in make test
def test_dpo_from_an_sft_adapter_under_zero3_saves_its_frozen_reference_whole(tiny_qwen, reference, tmp_path_factory):
    """The Trainer saves a peft model under ZeRO-3 from the gathered trainable weights only: DPO's frozen reference
    copy of the SFT adapter (`ref/`) came out with no tensors at all until the recipe gathered it too."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed (`make install` installs it)")
    from safetensors.torch import load_file

    from vlm_recipes.data.synthetic import save_generated_dataset

    root = tmp_path_factory.mktemp("dpo_zero3")
    preferences = save_generated_dataset(root / "data", "rlaif_v", train_rows=8, test_rows=2, seed=0)
    args = [
        REPO_ROOT / "recipes" / "demo" / "dpo_from_sft.yaml", "--model_name_or_path", tiny_qwen,
        "--tuning_strategy", "lora", "--sft_adapter_path", reference, "--dataset_name", preferences,
        "--output_dir", root / "run", "--overwrite_output_dir", "false", "--dtype", "float32", "--bf16", "false",
        "--max_steps", 2, "--per_device_train_batch_size", 2,
    ]  # fmt: skip
    result = accelerate_launch("zero3.yaml", *args, module="vlm_recipes.dpo")
    assert_ok(result)
    sft, frozen, trained = (
        load_file(path / "adapter_model.safetensors") for path in (reference, root / "run" / "ref", root / "run")
    )
    assert frozen.keys() == sft.keys() == trained.keys()
    for key, tensor in sft.items():
        torch.testing.assert_close(frozen[key], tensor)  # the reference is the SFT adapter, whole
    assert any(not torch.equal(trained[key], tensor) for key, tensor in sft.items())  # the policy trained


def test_fsdp_on_cpu_is_refused_rather_than_silently_ddp(tiny_qwen, chartqa_dir, tmp_path):
    """accelerate 1.15 applies FSDP only on GPUs (`AcceleratorState` picks FSDP for MULTI_GPU-like launches; CPU
    processes are MULTI_CPU): fsdp.yaml on CPUs would train with plain DDP, each process holding the whole model."""
    result = accelerate_launch("fsdp.yaml", *recipe_args(tiny_qwen, chartqa_dir, tmp_path / "run", 2))
    assert result.returncode != 0  # the launcher reports the processes' exit code 2 as its own failure
    message = result.stderr[result.stderr.find("error: ") :]
    assert message.startswith("error: This launch asks for FSDP, but accelerate applies FSDP only on GPUs")
    assert "multi_gpu.yaml" in message and "zero3.yaml" in message
    assert not re.search(r'File ".*vlm_recipes', result.stderr)  # one message, no traceback through our code
    assert not (tmp_path / "run").exists()  # refused before the output folder or any data


GPU_ONLY = pytest.mark.skipif(
    GPU_COUNT == 0,
    reason="needs a GPU: accelerate 1.15 applies FSDP only to GPU processes (on CPUs the run refuses, tested above), "
    "and 4-bit QLoRA's storage-dtype requirement under ZeRO-3/FSDP only shows on GPUs (DeepSpeed's CPU path accepts "
    "uint8 storage). The GPU run covers these.",
)


@GPU_ONLY
def test_fsdp_trains_like_one_process_on_gpus(tiny_qwen, planted_data, reference, tmp_path):
    processes = min(2, GPU_COUNT)
    args = recipe_args(tiny_qwen, planted_data, tmp_path / "run", processes)
    result = accelerate_launch("fsdp.yaml", *args, processes=processes)
    assert_ok(result)
    assert f"Launch: FSDP over {processes} processes" in result.stdout
    assert_same_losses(tmp_path / "run", reference)


@GPU_ONLY
@pytest.mark.parametrize("config", ["zero3.yaml", "fsdp.yaml"])
def test_qlora_under_sharded_launches_on_gpus(config, tiny_qwen, planted_data, tmp_path):
    from safetensors.torch import load_file

    processes = min(2, GPU_COUNT)
    args = [
        REPO_ROOT / "recipes" / "demo" / "sft_qlora.yaml", "--model_name_or_path", tiny_qwen,
        "--dataset_name", planted_data, "--output_dir", tmp_path / "run", "--overwrite_output_dir", "false",
        "--max_train_samples", 8, "--max_steps", 2, "--per_device_train_batch_size", 2,
    ]  # fmt: skip
    result = accelerate_launch(config, *args, processes=processes)
    assert_ok(result)
    assert all(t.numel() > 0 for t in load_file(tmp_path / "run" / "adapter_model.safetensors").values())


# ---------------------------------------------------------------------------------------------------------------------
# Two machines


@pytest.mark.extended  # the example Slurm script on two simulated machines (~60 s); the two-process DDP run stays in make test
def test_two_machines_through_the_slurm_script(tmp_path):
    """examples/slurm_multi_node.sh with accelerate_configs/multi_node.yaml, as SLURM would run it on two machines
    (one process each here): `srun` starts one task per machine with its SLURM_NODEID, all on this host."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    (stubs / "srun").write_text(
        "#!/bin/bash\nshift  # --ntasks-per-node=1\npids=()\nfor node in $(seq 0 $((SLURM_NNODES - 1))); do\n"
        '    SLURM_NODEID=$node "$@" > "$LOG_DIR/node$node.log" 2>&1 & pids+=($!)\ndone\n'
        'status=0\nfor pid in "${pids[@]}"; do wait "$pid" || status=1; done\nexit $status\n'
    )
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {
        "PATH": os.pathsep.join([str(stubs), str(os.path.dirname(sys.executable)), os.environ["PATH"]]),
        "ACCELERATE_CONFIG": "accelerate_configs/multi_node.yaml", "GPUS_PER_NODE": "1",
        "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[1-2]", "MAIN_PROCESS_PORT": str(free_port()),
        "LOG_DIR": str(tmp_path),
    }  # fmt: skip
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "examples" / "slurm_multi_node.sh")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    logs = {node: (tmp_path / f"node{node}.log").read_text() for node in (0, 1)}
    assert result.returncode == 0, (result.stderr, logs)
    assert "process 0 of 2: machine 0" in logs[0] and "process 1 of 2: machine 1" in logs[1]
    assert "Launch: 2 process(es) on 2 machine(s), backend gloo; all-reduce of the ranks: ok" in logs[0]


# ---------------------------------------------------------------------------------------------------------------------
# The handling of each trap, on its own (in this process, no launch)


@pytest.fixture(scope="module")
def mixed_jsonl(tmp_path_factory):
    """A conversations JSONL with 20 rows: every row has a chart image except row 3, which is text only."""
    from PIL import Image

    root = tmp_path_factory.mktemp("mixed")
    Image.new("RGB", (64, 48), "white").save(root / "chart.png")
    rows = []
    for index in range(20):
        image = index != 3
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": ("<image>" if image else "") + f"Question {index}?"},
                    {"role": "assistant", "content": str(index)},
                ],
                "images": ["chart.png"] if image else [],
            }
        )
    (root / "mixed.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return root / "mixed.jsonl"


def prepare(model, data, output_dir, launch, monkeypatch, *extra):
    from vlm_recipes import sft
    from vlm_recipes.recipe import parse_recipe
    from vlm_recipes.training import run

    monkeypatch.setattr(run, "describe_launch", lambda training_args: launch)
    args = [
        DEMO_RECIPE, "--model_name_or_path", model, "--dataset_name", data, "--formatter", "conversations",
        "--dataset_test_split", "none", "--output_dir", output_dir, "--overwrite_output_dir", "false", *extra,
    ]  # fmt: skip
    recipe = parse_recipe(sft.SFTRecipe, [str(a) for a in args])
    return run.prepare_output_and_data(recipe, run.resolve_model(recipe).load_processor(), task="sft")


ZERO3 = dict(processes=2, machines=1, backend="gloo", engine="deepspeed", zero_stage=3)


def test_text_only_rows_are_left_out_of_a_sharded_launch_and_counted(tiny_qwen, mixed_jsonl, tmp_path, monkeypatch):
    from vlm_recipes.training.distributed import Launch, image_counts

    train, _ = prepare(tiny_qwen, mixed_jsonl, tmp_path / "zero3", Launch(**ZERO3), monkeypatch)
    assert len(train) == 19 and all(image_counts(train))  # every batch multimodal
    report = json.loads((tmp_path / "zero3" / "data_report.json").read_text())
    assert report["train"]["rejected_by_reason"][TEXT_ONLY_REASON]["count"] == 1
    assert "multi_gpu.yaml" in report["train"]["rejected_by_reason"][TEXT_ONLY_REASON]["first_message"]

    ddp = Launch(**{**ZERO3, "engine": "ddp", "zero_stage": None})
    train, _ = prepare(tiny_qwen, mixed_jsonl, tmp_path / "ddp", ddp, monkeypatch)
    assert len(train) == 20  # under DDP text-only rows are fine (and DDP then looks for unused parameters)


def test_too_many_text_only_rows_stop_a_sharded_launch_before_the_model_loads(
    tiny_qwen, mixed_jsonl, tmp_path, monkeypatch
):
    from vlm_recipes.errors import DataError
    from vlm_recipes.training.distributed import Launch

    fsdp = Launch(**{**ZERO3, "engine": "fsdp", "zero_stage": None})
    with pytest.raises(DataError, match=r"1 of 20 rows of the 'train' split were rejected .* text-only row"):
        prepare(tiny_qwen, mixed_jsonl, tmp_path / "fsdp", fsdp, monkeypatch, "--max_bad_fraction", "0.01")


def test_find_unused_parameters_only_where_a_step_can_skip_trained_weights(tiny_qwen):
    from vlm_recipes.configs import ModelArguments, TuningArguments
    from vlm_recipes.modeling.loading import load_for_training
    from vlm_recipes.modeling.setup import resolve_model_setup
    from vlm_recipes.training.distributed import find_unused_parameters

    def loaded(tuning):
        setup = resolve_model_setup(ModelArguments(model_name_or_path=str(tiny_qwen), dtype="float32"), tuning, 1e-4)
        return load_for_training(setup), setup.family

    expected = {"lora": False, "qlora": False, "lora_llm_full_vit": True, "projector_only": True, "full": True}
    for strategy, search in expected.items():
        assert find_unused_parameters(*loaded(TuningArguments(strategy))) is search, strategy
    # text-only batches skip a trained projector
    assert find_unused_parameters(*loaded(TuningArguments("lora", train_projector=True))) is True


def test_qlora_storage_dtype_follows_the_compute_dtype_when_sharded():
    from vlm_recipes.configs import ModelArguments
    from vlm_recipes.errors import RecipeError
    from vlm_recipes.modeling.base_model import quantization_config
    from vlm_recipes.modeling.families import FAMILIES

    family = FAMILIES["qwen2_5_vl"]
    qlora = ModelArguments(model_name_or_path="m", load_in_4bit=True, dtype="bfloat16")
    assert quantization_config(qlora, family).bnb_4bit_quant_storage == torch.uint8  # one GPU: packed bytes
    assert quantization_config(qlora, family, shard_parameters=True).bnb_4bit_quant_storage == torch.bfloat16
    fp16 = ModelArguments(model_name_or_path="m", load_in_4bit=True, dtype="float16")
    assert quantization_config(fp16, family, shard_parameters=True).bnb_4bit_quant_storage == torch.float16
    clash = ModelArguments(model_name_or_path="m", load_in_4bit=True, bnb_4bit_quant_storage="uint8")
    with pytest.raises(RecipeError, match="`bnb_4bit_quant_storage: uint8` does not work when ZeRO-3 or FSDP"):
        quantization_config(clash, family, shard_parameters=True)


def test_an_empty_or_incomplete_saved_adapter_fails_loudly(tiny_qwen, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText

    from vlm_recipes.errors import RecipeError
    from vlm_recipes.training.outputs import check_saved_adapters

    model = get_peft_model(
        AutoModelForImageTextToText.from_pretrained(tiny_qwen),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    model.save_pretrained(tmp_path)
    check_saved_adapters(model, tmp_path)  # complete: passes

    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    first = next(iter(tensors))
    save_file({**tensors, first: torch.empty(0)}, path)  # what an ungathered ZeRO-3 shard looks like
    with pytest.raises(RecipeError, match=r"tensors are empty .*zero3_save_16bit_model: true"):
        check_saved_adapters(model, tmp_path)
    save_file({key: value for key, value in tensors.items() if key != first}, path)
    with pytest.raises(RecipeError, match="tensors are missing"):
        check_saved_adapters(model, tmp_path)


@pytest.mark.extended  # a streamed run on two processes (~80 s); tests/test_streaming.py proves the sharding in process
def test_a_stream_trains_on_two_processes_like_one(tiny_qwen, tmp_path):
    """`streaming: true` under DDP: each process reads the stream and keeps its half of each global batch, so the two
    processes train on the one-process run's batches (the same losses), and the data report counts each row once."""
    from vlm_recipes import sft
    from vlm_recipes.data.synthetic import make_chartqa_rows

    charts = make_chartqa_rows(4, seed=3)
    for index, chart in enumerate(charts):
        chart["image"].save(tmp_path / f"chart{index}.png")
    lines = [{"images": [f"chart{index % 4}.png"], "messages": [
        {"role": "user", "content": "<image>" + charts[index % 4]["query"]},
        {"role": "assistant", "content": f"{charts[index % 4]['label'][0]} (row {index})"}]} for index in range(24)]  # fmt: skip
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    stream = ["--formatter", "conversations", "--dataset_test_split", "none", "--streaming", "true",
              "--shuffle_buffer_size", 8]  # fmt: skip
    data = tmp_path / "rows.jsonl"
    sft.main([str(arg) for arg in recipe_args(tiny_qwen, data, tmp_path / "one", 1, *stream)])
    result = accelerate_launch("multi_gpu.yaml", *recipe_args(tiny_qwen, data, tmp_path / "two", 2, *stream))
    assert_ok(result)
    assert_same_losses(tmp_path / "two", tmp_path / "one")
    reports = [json.loads((tmp_path / run / "data_report.json").read_text())["train"] for run in ("one", "two")]
    assert reports[0]["rows"] == reports[1]["rows"] == 16  # max_train_samples of the stream, each counted once
