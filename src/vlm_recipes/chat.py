"""Ask a model one question about an image: a quick look at a fine-tune.

    python -m vlm_recipes.chat --adapter outputs/run --image chart.png --question "Which year is highest?"
    python -m vlm_recipes.chat --model outputs/merged --image chart.png --question "..."

`--model` is a base or merged model (a Hub id or a folder); `--adapter` adds a trained adapter, and alone loads the
base it names (an adapter folder with `sft_adapter/`, from DPO with `reference: sft_merged`, loads on base + that
SFT adapter merged in). The system prompt defaults to the one the model was trained with (the `recipe.yaml` saved
with it).
Generation is greedy, with the same code evaluation uses.
"""

import argparse
import sys
from pathlib import Path
from typing import Any

from vlm_recipes.configs import ModelArguments
from vlm_recipes.console import setup_console
from vlm_recipes.data.images import ImageProblem, decode_image, to_rgb
from vlm_recipes.errors import RecipeError, exit_on_recipe_error
from vlm_recipes.evaluation.generate import generate_answers
from vlm_recipes.modeling.adapters import adapter_model_arguments
from vlm_recipes.modeling.loading import load_for_inference
from vlm_recipes.run_folder import read_saved_recipe


def load_image(path: str) -> Any:
    """The image as training saw its images: decoded in full (within PIL's decompression limit) and made RGB the way
    the data checks do (`data.images`); a file that cannot be used is one error naming it."""
    try:
        return to_rgb(decode_image(path))
    except ImageProblem as problem:
        raise RecipeError(f"--image {path}: the image {str(problem).rstrip('.')}.") from None


def chat_row(images: list[Any], question: str, system_prompt: str | None) -> dict[str, Any]:
    """A row in the formatters' shape: images first, then the question."""
    system = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] if system_prompt else []
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    return {"images": images, "messages": [*system, {"role": "user", "content": content}]}


def answer(
    question: str,
    images: list[str],
    *,
    model: str | None = None,
    adapter: str | None = None,
    system_prompt: str | None = None,
    max_new_tokens: int = 128,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> str:
    if not model and not adapter:
        raise RecipeError("Pass --model (a base or merged model) or --adapter (a trained adapter folder), or both.")
    overrides = {"dtype": dtype} if dtype else {}
    if adapter:
        model_args = adapter_model_arguments(adapter, model, **overrides)
    else:
        model_args = ModelArguments(model_name_or_path=model, **overrides)
    saved = read_saved_recipe(adapter or model) if Path(adapter or model).is_dir() else {}
    if system_prompt is None:
        system_prompt = saved.get("system_prompt")
    pictures = [load_image(path) for path in images]  # a bad image fails before the model loads
    loaded, processor, _ = load_for_inference(model_args, adapter, trust_remote_code)
    row = chat_row(pictures, question, system_prompt)
    return generate_answers(loaded, processor, [row], batch_size=1, max_new_tokens=max_new_tokens, progress=False)[0]


@exit_on_recipe_error
def main(argv: list[str] | None = None) -> str:
    setup_console()
    parser = argparse.ArgumentParser(prog="python -m vlm_recipes.chat", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Base or merged model: a Hub id or a folder.")
    parser.add_argument("--adapter", default=None, help="A trained adapter folder; alone, it loads the base it names.")
    parser.add_argument("--image", action="append", required=True, help="An image file (repeat for several).")
    parser.add_argument("--question", required=True)
    parser.add_argument("--system_prompt", default=None, help="Default: the trained model's, from its recipe.yaml.")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None)
    parser.add_argument("--trust_remote_code", action="store_true")
    args = parser.parse_args(argv)
    reply = answer(
        args.question,
        args.image,
        model=args.model,
        adapter=args.adapter,
        system_prompt=args.system_prompt,
        max_new_tokens=args.max_new_tokens,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
    print(reply, flush=True)
    if not reply:
        print("(the model ended its answer at once: an empty reply)", file=sys.stderr, flush=True)
    return reply


if __name__ == "__main__":
    main()
