# vlm-recipes. `make demo` and `make test` install what they need on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
CACHE := .cache
TINY_MODEL := $(CACHE)/tiny/qwen2_5_vl
DEMO_DATA := $(CACHE)/data/chartqa_synthetic
DEMO_PREFERENCES := $(CACHE)/data/rlaif_v_synthetic
RECIPE ?= recipes/chartqa.yaml
DPO_RECIPE ?= recipes/rlaif_v.yaml
GRPO_RECIPE ?= recipes/chartqa_grpo.yaml
KTO_RECIPE ?= recipes/rlaif_v_kto.yaml
ACCELERATE_CONFIG ?= accelerate_configs/single_gpu.yaml
# This checkout's sources win over any installed copy (also in a git worktree that shares another checkout's .venv).
export PYTHONPATH := $(CURDIR)/src
# Offline by default for the demo and the tests: nothing here needs the Hub.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: install demo demo-grpo demo-kto test test-extended bench bench-gpu gpu-wheels docs sft dpo grpo kto preflight style quality clean-demo

install: $(INSTALLED)

# Re-runs only when pyproject.toml changes. uv installs in ~30 s where pip takes ~200 s. The deepspeed extra makes the
# ZeRO-2/ZeRO-3 tests run for real. DeepSpeed builds a small shared-memory op for CPU processes on first use (~50 s on
# 2 cores, cached in ~/.cache/torch_extensions): built here once rather than inside the first run that needs it. The ui,
# tensorboard and wandb extras let the web chat and each logger be tested (offline).
$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv
	$(VENV)/bin/uv pip install --python $(PY) --quiet -e ".[dev,deepspeed,ui,tensorboard,wandb]"
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" \
		|| echo "DeepSpeed's CPU communication op was not prebuilt; it builds on first use."
	touch $@

$(TINY_MODEL)/config.json: | $(INSTALLED)
	$(OFFLINE) $(PY) -m vlm_recipes.testing.tiny_models --family qwen2_5_vl --output_dir $(TINY_MODEL)

$(DEMO_DATA)/data/train-00000-of-00001.parquet: | $(INSTALLED)
	$(PY) -m vlm_recipes.data.synthetic --output_dir $(DEMO_DATA) --train_rows 256 --test_rows 32

$(DEMO_PREFERENCES)/data/train-00000-of-00001.parquet: | $(INSTALLED)
	$(PY) -m vlm_recipes.data.synthetic --schema rlaif_v --output_dir $(DEMO_PREFERENCES) --train_rows 128 --test_rows 16

# The main job, offline on CPU: a tiny random Qwen2.5-VL, generated charts, QLoRA SFT through the real entry point,
# then DPO from that SFT adapter on generated chart preferences (reward margin and accuracy printed at start and end).
demo: $(INSTALLED) $(TINY_MODEL)/config.json $(DEMO_DATA)/data/train-00000-of-00001.parquet \
		$(DEMO_PREFERENCES)/data/train-00000-of-00001.parquet
	$(OFFLINE) $(PY) -m vlm_recipes.sft recipes/demo/sft_qlora.yaml
	$(OFFLINE) $(PY) -m vlm_recipes.dpo recipes/demo/dpo_from_sft.yaml

# GRPO, offline on CPU: full SFT of the tiny model on generated charts, then GRPO from it with ChartQA's relaxed
# accuracy and the answer-format reward (the mean reward printed at the first and last step).
demo-grpo: $(INSTALLED) $(TINY_MODEL)/config.json $(DEMO_DATA)/data/train-00000-of-00001.parquet
	$(OFFLINE) $(PY) -m vlm_recipes.sft recipes/demo/sft_full.yaml
	$(OFFLINE) $(PY) -m vlm_recipes.grpo recipes/demo/grpo_from_sft.yaml

# KTO, offline on CPU: generated chart preferences split into desirable and undesirable answers, a new LoRA adapter.
demo-kto: $(INSTALLED) $(TINY_MODEL)/config.json $(DEMO_PREFERENCES)/data/train-00000-of-00001.parquet
	$(OFFLINE) $(PY) -m vlm_recipes.kto recipes/demo/kto_lora.yaml

# Any family's tiny model: make demo-gemma3, make demo-qwen3_5, ... (recipes/demo/<family>.yaml)
demo-%: $(INSTALLED) $(DEMO_DATA)/data/train-00000-of-00001.parquet
	$(OFFLINE) $(PY) -m vlm_recipes.testing.tiny_models --family $* --output_dir $(CACHE)/tiny/$*
	$(OFFLINE) $(PY) -m vlm_recipes.sft recipes/demo/$*.yaml

# Two pytest workers (pytest-xdist): most of the suite's time is single-threaded (imports and subprocess start-up of the
# end-to-end runs). A file's tests stay on one worker (module fixtures such as the DDP and ZeRO runs run once), except
# the files tests/conftest.py spreads test by test. `make test TEST_WORKERS=0` runs serially. Tests marked `extended`
# (the rest of the strategy x family matrix, DPO of every family, ZeRO-2, ZeRO-3 DPO, the Slurm script, the
# benchmarks' wiring) are left out to keep `make test` under 20 minutes on 2 cores; `make test-extended` runs them.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadscope)
test: $(INSTALLED)
	$(OFFLINE) $(PY) -m pytest tests -m "not extended" $(XDIST)

test-extended: $(INSTALLED)
	$(OFFLINE) $(PY) -m pytest tests -m extended $(XDIST)

# Plain TRL against the package at the real width of Qwen2.5-VL-3B and -7B (the parts of a step measured, the full
# depth composed; benchmarks/results/cpu_real_width.md), then the tiny-model plumbing check (cpu.md), then GRPO's
# image encodings per generation batch with and without the images-once cache (cpu_grpo_images.md, ~6 minutes). On 2
# CPU cores shared with other work: about 30 minutes (see the results files for when and how they were measured).
bench: $(INSTALLED)
	$(OFFLINE) $(PY) benchmarks/real_width.py
	$(OFFLINE) $(PY) benchmarks/speed.py --steps 2
	$(OFFLINE) $(PY) benchmarks/grpo_images.py

# The GPU check, on a machine that reaches no registry: `make gpu-wheels` here first (about 60 MB into .whl/, which a
# device run carries), then `make bench-gpu` there (installs from .whl/, then benchmarks/results/gpu.md).
GPU_REQUIREMENTS := benchmarks/gpu_requirements.txt
gpu-wheels: $(INSTALLED)
	mkdir -p .whl
	for version in 3.11 3.12 3.13; do \
		$(PY) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
			--python-version $$version --implementation cp --platform manylinux2014_x86_64 \
			--platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 \
			--dest .whl -r $(GPU_REQUIREMENTS) || exit 1; \
	done
	du -sh .whl

bench-gpu:
	bash benchmarks/bench_gpu.sh

# The manual as a static site in site/: the field reference regenerated from the dataclasses, then a strict build (a
# broken link or anchor fails it). `$(VENV)/bin/mkdocs serve` previews the pages while you edit them.
docs: $(INSTALLED)
	$(OFFLINE) $(PY) -m vlm_recipes.docs_reference
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# make sft RECIPE=recipes/chartqa.yaml [ACCELERATE_CONFIG=accelerate_configs/multi_gpu.yaml]
sft: $(INSTALLED)
	$(VENV)/bin/accelerate launch --config_file $(ACCELERATE_CONFIG) -m vlm_recipes.sft $(RECIPE)

# make dpo [RECIPE=recipes/rlaif_v.yaml] [ACCELERATE_CONFIG=...]: RECIPE given on the command line wins over DPO_RECIPE.
dpo: $(INSTALLED)
	$(VENV)/bin/accelerate launch --config_file $(ACCELERATE_CONFIG) -m vlm_recipes.dpo \
		$(if $(filter command line,$(origin RECIPE)),$(RECIPE),$(DPO_RECIPE))

# make grpo [RECIPE=recipes/chartqa_grpo.yaml] [ACCELERATE_CONFIG=...]
grpo: $(INSTALLED)
	$(VENV)/bin/accelerate launch --config_file $(ACCELERATE_CONFIG) -m vlm_recipes.grpo \
		$(if $(filter command line,$(origin RECIPE)),$(RECIPE),$(GRPO_RECIPE))

# make kto [RECIPE=recipes/rlaif_v_kto.yaml] [ACCELERATE_CONFIG=...]
kto: $(INSTALLED)
	$(VENV)/bin/accelerate launch --config_file $(ACCELERATE_CONFIG) -m vlm_recipes.kto \
		$(if $(filter command line,$(origin RECIPE)),$(RECIPE),$(KTO_RECIPE))

# make preflight RECIPE=recipes/chartqa.yaml: the data checks, token lengths, padding and a memory estimate, no weights
preflight: $(INSTALLED)
	$(PY) -m vlm_recipes.preflight $(RECIPE)

style: $(INSTALLED)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

quality: $(INSTALLED)
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/ruff check src tests benchmarks

clean-demo:
	rm -rf outputs/demo
