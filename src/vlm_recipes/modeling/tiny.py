"""Tiny random vision-language models, built offline from a family's config, saved as ordinary model folders.

Each tiny model has random weights, a small BPE tokenizer trained here that carries the family's real special tokens,
the family's real chat template and image-processor settings, and a config whose special-token ids come from that
tokenizer. Everything downstream loads it with `from_pretrained`, exactly as it loads a real checkpoint: the demo and
the tests run the product's real code paths on it.

    python -m vlm_recipes.modeling.tiny --family qwen2_5_vl --output_dir .cache/tiny/qwen2_5_vl
"""

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlm_recipes.errors import RecipeError, exit_on_recipe_error


TINY_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
# Wider than the usual 0.02: with 64 hidden units, 0.02 leaves the frozen output head too weak for a LoRA adapter to
# move the logits, so the tiny models' loss would barely fall under LoRA (measured: 6.4 -> 5.7 in 80 QLoRA steps at
# 0.02; 6.5 -> 3.1 at 0.1).
INIT_RANGE = 0.1
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

TOKENIZER_CORPUS_EXTRA = """You are a helpful assistant. Answer the question about the chart with a single word or number.
The chart shows values for each category. The highest bar belongs to the first group, and the line rises every year.
Describe the image. What is shown in this picture? A cat sits on a red chair next to a window on a sunny day.
Yes No The answer is. Picture Video percent average ratio difference total sum value year peak lowest highest."""

BuildFunction = Callable[[Path, int | None, int], None]
TINY_BUILDERS: dict[str, BuildFunction] = {}


def register_tiny_builder(family: str):
    def decorate(function: BuildFunction) -> BuildFunction:
        TINY_BUILDERS[family] = function
        return function

    return decorate


def tokenizer_corpus(num_rows: int = 400, seed: int = 0) -> list[str]:
    """Text like what the tiny models will see: generated chart questions and answers, plus chat-template words."""
    from vlm_recipes.data.synthetic import CATEGORIES, bar_chart_questions, line_chart_questions

    rng = random.Random(seed)
    lines = TOKENIZER_CORPUS_EXTRA.splitlines()
    for _ in range(num_rows):
        labels = rng.sample(CATEGORIES, 4)
        values = [float(rng.randint(1, 99)) for _ in labels]
        years = list(range(2000, 2006))
        for query, answer in bar_chart_questions(labels, values, rng) + line_chart_questions(
            years, values + [1.5, 2.5], rng
        ):
            lines.append(f"user\n{query}\nassistant\n{answer}\n")
    lines.extend(str(number) for number in range(0, 2100))
    return lines


def train_bpe(
    special_tokens: list[str],
    normalizer: Any,
    pre_tokenizer: Any,
    vocab_size: int = 1024,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE trained on `tokenizer_corpus()`, special tokens first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(merge) for merge in model["merges"]]


def trl_chat_template(name: str) -> str:
    """A stock chat template as TRL stores it (byte-identical to the model's own, which is how TRL recognises it)."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / name).read_text(encoding="utf-8")


def check_token_ids(tokenizer: Any, tokens: list[str]) -> dict[str, int]:
    """Ids of `tokens` in `tokenizer`; each must be a single known token."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in tokens}
    unknown = [token for token, token_id in ids.items() if token_id is None or token_id == tokenizer.unk_token_id]
    if unknown:
        raise RuntimeError(f"tiny tokenizer lacks {unknown}")
    return ids


def save_tiny(output_dir: Path, model: Any, processor: Any, generation: dict[str, Any]) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(**generation)
    model.save_pretrained(output_dir, safe_serialization=True)
    processor.save_pretrained(output_dir)
    (output_dir / "TINY_MODEL.md").write_text(
        "Random weights, built by `python -m vlm_recipes.modeling.tiny` for tests and demos. Not a trained model.\n",
        encoding="utf-8",
    )


# ---------------------------------------------------------------------------------------------------------------------
# Qwen2-VL and Qwen2.5-VL

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
# Qwen2-VL-7B-Instruct and Qwen2.5-VL-7B-Instruct preprocessor_config.json
QWEN_IMAGE_PROCESSOR = dict(
    size={"shortest_edge": 3136, "longest_edge": 12845056},
    patch_size=14,
    temporal_patch_size=2,
    merge_size=2,
    image_mean=CLIP_MEAN,
    image_std=CLIP_STD,
)


def qwen_tokenizer():
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    vocab, merges = train_bpe(
        QWEN_SPECIAL_TOKENS,
        normalizers.NFC(),
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
    )
    # As the real Qwen2.5-VL tokenizer: no BOS, <|im_end|> ends a turn, <|endoftext|> pads.
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in QWEN_SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
    )


def _qwen_vl(output_dir: Path, vocab_size: int | None, seed: int, *, version: str) -> None:
    import torch
    from transformers import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    if version == "2.5":
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
        from transformers import Qwen2_5_VLProcessor as Processor

        # Qwen2.5-VL vision: window attention except in the full-attention blocks; out_hidden_size feeds the LLM.
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TINY_TEXT["hidden_size"],
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
        )  # fmt: skip
    else:
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model
        from transformers import Qwen2VLProcessor as Processor

        vision = dict(
            depth=2, embed_dim=32, hidden_size=TINY_TEXT["hidden_size"], mlp_ratio=2, num_heads=2,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        )  # fmt: skip

    tokenizer = qwen_tokenizer()
    processor = Processor(
        image_processor=Qwen2VLImageProcessor(**QWEN_IMAGE_PROCESSOR),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=trl_chat_template("qwen2_5_vl.jinja"),  # Qwen2-VL ships the byte-identical template
    )
    ids = check_token_ids(
        tokenizer,
        ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>", "<|im_end|>"],
    )
    head_dim = TINY_TEXT["hidden_size"] // TINY_TEXT["num_attention_heads"]
    config = Config(
        text_config=dict(
            **TINY_TEXT,
            vocab_size=vocab_size or len(tokenizer),
            max_position_embeddings=32768,
            initializer_range=INIT_RANGE,
            # mrope_section splits the rotary half-dimension over (time, height, width): it must sum to head_dim/2.
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    assert sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    torch.manual_seed(seed)
    model = Model(config)
    generation = dict(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )
    save_tiny(output_dir, model, processor, generation)


@register_tiny_builder("qwen2_5_vl")
def build_qwen2_5_vl(output_dir: Path, vocab_size: int | None = None, seed: int = 0) -> None:
    _qwen_vl(output_dir, vocab_size, seed, version="2.5")


@register_tiny_builder("qwen2_vl")
def build_qwen2_vl(output_dir: Path, vocab_size: int | None = None, seed: int = 0) -> None:
    _qwen_vl(output_dir, vocab_size, seed, version="2")


# ---------------------------------------------------------------------------------------------------------------------


def build_tiny_model(
    family: str, output_dir: str | Path, *, vocab_size: int | None = None, seed: int = 0, exist_ok: bool = True
) -> Path:
    """Build and save the tiny model of `family` in `output_dir`; reuse a complete one already there.

    `vocab_size` sets the model's embedding rows independently of the tiny tokenizer (for example 151,936 to measure
    memory with a real-size vocabulary); rows past the tokenizer are never produced by it, like the real checkpoints'
    padding rows.
    """
    if family not in TINY_BUILDERS:
        raise RecipeError(f"No tiny builder for '{family}'. Available: {', '.join(sorted(TINY_BUILDERS))}.")
    output_dir = Path(output_dir)
    if (output_dir / "config.json").exists() and (output_dir / "model.safetensors").exists():
        if exist_ok:
            return output_dir
        raise RecipeError(f"{output_dir} already holds a model; remove it or pass --force to rebuild.")
    if output_dir.exists() and any(output_dir.iterdir()) and not (output_dir / "TINY_MODEL.md").exists():
        raise RecipeError(f"{output_dir} is not empty and is not a tiny model folder; choose another output_dir.")
    output_dir.mkdir(parents=True, exist_ok=True)
    TINY_BUILDERS[family](output_dir, vocab_size, seed)
    return output_dir


@exit_on_recipe_error
def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a tiny random vision-language model folder (offline).")
    parser.add_argument("--family", default="qwen2_5_vl", choices=sorted(TINY_BUILDERS))
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--vocab_size", type=int, default=None, help="Embedding rows (default: the tiny tokenizer's size)."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="Rebuild even if a tiny model is already there.")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    if args.force and (output_dir / "TINY_MODEL.md").exists():
        import shutil

        shutil.rmtree(output_dir)
    path = build_tiny_model(args.family, output_dir, vocab_size=args.vocab_size, seed=args.seed)
    print(f"Tiny {args.family} model in {path}")


if __name__ == "__main__":
    cli()
