"""Merge a LoRA adapter into its base model's weights and save a full model with its processor.

    python -m vlm_recipes.merge --adapter outputs/qwen2.5-vl-7b-chartqa-qlora --output_dir outputs/merged

The base model and its settings come from the adapter folder (`adapter_config.json` and the `recipe.yaml` saved with
it). The base always loads in 16 or 32 bit, also for an adapter trained with QLoRA: 4-bit weights cannot hold a merged
update. (The adapter of a QLoRA run learned against the 4-bit base; merged into the 16-bit weights its outputs differ
slightly from what training saw, which is the usual QLoRA trade-off.) The merged model is saved as safetensors.
A DPO adapter that applies on top of an SFT adapter (`sft_adapter/` in its folder, `reference: sft_merged`) gives
base + SFT + DPO: the SFT adapter is merged first (`modeling.loading.load_for_inference`).
"""

import argparse
import shutil
from pathlib import Path

from vlm_recipes.console import print_main, setup_console
from vlm_recipes.errors import RecipeError, exit_on_recipe_error
from vlm_recipes.modeling.adapters import adapter_model_arguments
from vlm_recipes.modeling.loading import load_for_inference
from vlm_recipes.run_folder import RECIPE_FILE, sft_adapter_under
from vlm_recipes.training.output_folder import prepare_output_dir


MERGE_DTYPES = ("bfloat16", "float16", "float32")


def merge_dtype(requested: str | None, recipe_dtype: str | None) -> str:
    """The dtype the base loads in: the one asked for, else the recipe's when it is a 16/32-bit float, else bf16."""
    if requested:
        return requested
    return recipe_dtype if recipe_dtype in MERGE_DTYPES else "bfloat16"


def merge(
    adapter: str,
    output_dir: str,
    *,
    base: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    probe = adapter_model_arguments(adapter, base)
    model_args = adapter_model_arguments(
        adapter, base, load_in_4bit=False, load_in_8bit=False, dtype=merge_dtype(dtype, probe.dtype)
    )
    if Path(output_dir).resolve() == Path(adapter).resolve():
        raise RecipeError("--output_dir must differ from --adapter: the merged model is a new folder.")
    base_folder = Path(str(model_args.model_name_or_path)).expanduser()
    protected = {
        "the adapter's folder": adapter,
        "the base model's folder": base_folder if base_folder.is_dir() else None,
    }
    output = prepare_output_dir(output_dir, overwrite=overwrite, resume=None, protected=protected)
    print_main(
        f"Merging {adapter} into {model_args.model_name_or_path} ({model_args.dtype}"
        + (", trained with QLoRA: the base loads unquantized" if probe.load_in_4bit else "")
        + (f", on top of the SFT adapter in {sft_adapter_under(adapter)}" if sft_adapter_under(adapter) else "")
        + ")"
    )
    model, processor, _ = load_for_inference(model_args, adapter, trust_remote_code)
    merged = model.merge_and_unload()
    merged.save_pretrained(output, safe_serialization=True)
    processor.save_pretrained(output)
    if (Path(adapter) / RECIPE_FILE).is_file():  # what the merged weights were trained with
        shutil.copyfile(Path(adapter) / RECIPE_FILE, output / RECIPE_FILE)
    print_main(f"Merged model in {output.resolve()}")
    return output


@exit_on_recipe_error
def main(argv: list[str] | None = None) -> Path:
    setup_console()
    parser = argparse.ArgumentParser(prog="python -m vlm_recipes.merge", description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="The adapter folder (a LoRA/QLoRA run's output_dir).")
    parser.add_argument("--output_dir", required=True, help="A new (or empty) folder for the merged model.")
    parser.add_argument("--base", default=None, help="The base model, when not the one adapter_config.json names.")
    parser.add_argument("--dtype", choices=MERGE_DTYPES, default=None, help="Default: the recipe's, else bfloat16.")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="Replace a non-empty --output_dir.")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow the base model's own code.")
    args = parser.parse_args(argv)
    return merge(
        args.adapter,
        args.output_dir,
        base=args.base,
        dtype=args.dtype,
        overwrite=args.overwrite_output_dir,
        trust_remote_code=args.trust_remote_code,
    )


if __name__ == "__main__":
    main()
