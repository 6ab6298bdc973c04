"""How long `python -m vlm_recipes.preflight` takes on a large dataset: generated ChartQA-like rows, realistic sizes.

    python benchmarks/preflight_scale.py --rows 30000 --unique_rows 3000 --check_num_proc 2

Draws `unique_rows` charts with widths 300-1600 px and heights 200-1200 px (like the real ChartQA), repeats them to
`rows` rows (every row still carries, decodes and checks its own copy of the image bytes), saves the set as parquet and
runs the real preflight command on it with the tiny Qwen2.5-VL, timing the whole command. Prints the preflight's output
and the wall time. Further arguments go to the preflight (a changed check setting, such as `--min_image_side 5`, also
makes it check again instead of reusing the cached results of an earlier run).
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=30000)
    parser.add_argument("--unique_rows", type=int, default=3000)
    parser.add_argument("--check_num_proc", type=int, default=2)
    parser.add_argument("--workdir", default=".cache/bench/preflight")
    args, extra = parser.parse_known_args()  # anything else goes to the preflight command (recipe overrides)

    from datasets import concatenate_datasets, load_dataset

    from vlm_recipes.data.synthetic import REALISTIC_SIZES, chartqa_features, make_chartqa_rows, save_splits
    from vlm_recipes.testing.tiny_models import build_tiny_model

    workdir = Path(args.workdir)
    model = build_tiny_model("qwen2_5_vl", workdir / "tiny")
    data = workdir / f"chartqa_{args.rows}"
    if not (data / "data" / "train-00000-of-00001.parquet").exists():
        unique = save_splits(
            workdir / f"unique_{args.unique_rows}",
            {"train": make_chartqa_rows(args.unique_rows, seed=0, sizes=REALISTIC_SIZES)},
            chartqa_features(),
        )
        base = load_dataset(str(unique), split="train")
        repeats = -(-args.rows // len(base))
        rows = concatenate_datasets([base] * repeats).select(range(args.rows))
        (data / "data").mkdir(parents=True, exist_ok=True)
        rows.to_parquet(str(data / "data" / "train-00000-of-00001.parquet"))

    command = [
        sys.executable, "-m", "vlm_recipes.preflight", "recipes/chartqa.yaml", "--model_name_or_path", str(model),
        "--dataset_name", str(data), "--dataset_test_split", "none", "--eval_strategy", "no",
        "--check_num_proc", str(args.check_num_proc), "--image_max_pixels", "1003520", *extra,
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    print(result.stdout)
    if result.returncode:
        print(result.stderr[-3000:])
    print(f"preflight on {args.rows:,} rows with {args.check_num_proc} check process(es): {seconds:.0f} s wall")


if __name__ == "__main__":
    main()
