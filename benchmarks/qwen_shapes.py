"""Qwen2.5-VL-3B and -7B as published, for benchmarks that build them with random weights (no download).

The values are the `config.json` of `Qwen/Qwen2.5-VL-3B-Instruct` and `Qwen/Qwen2.5-VL-7B-Instruct` on the Hub.
transformers' `Qwen2_5_VLConfig()` defaults are neither (its vocabulary, vision output width and norm epsilon differ),
so every field a benchmark's speed or memory depends on is written out here. "test" is a small shape of the same
layout, for checking a benchmark's wiring on a CPU; it is never a figure.

A model built here takes its tokenizer, processor and special-token ids from the package's tiny Qwen2.5-VL: rows are a
few dozen text tokens plus image tokens, and the image tokens, which dominate, follow the real processor's resize rule.
"""

from pathlib import Path
from typing import Any


# The vision tower is the same in both sizes except for the width it projects to (the language model's).
PUBLISHED_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    hidden_act="silu",
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
)
PUBLISHED_TEXT = {
    "3B": dict(
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=128000,
    ),
    "7B": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=128000,
    ),
    "test": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=False,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=128000,
    ),
}
TEST_VISION = dict(
    PUBLISHED_VISION, depth=2, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[1]
)
MROPE_SECTION = [16, 24, 24]  # both published sizes: head_dim 128, so the sections sum to 64
SIZES = tuple(PUBLISHED_TEXT)


def vision_shape(size: str) -> dict[str, Any]:
    return dict(TEST_VISION if size == "test" else PUBLISHED_VISION)


def cut_full_attention_blocks(depth: int, published_depth: int, published_full: list[int]) -> list[int]:
    """Full-attention block indexes for a vision tower cut to `depth` blocks: the published ones that remain, or the
    last block when none remains (so a cut tower still has both kinds of block to time)."""
    if depth >= published_depth:
        return list(published_full)
    kept = [index for index in published_full if index < depth]
    return kept or [depth - 1]


def real_width_config(
    base: Any,
    size: str,
    *,
    text_layers: int | None = None,
    vision_depth: int | None = None,
    vocab_size: int | None = None,
    tie_word_embeddings: bool | None = None,
) -> Any:
    """A copy of `base` (a Qwen2.5-VL config with the tokenizer's special-token ids) with the published shapes of
    `size`; depth cut to `text_layers` decoder layers and `vision_depth` vision blocks, vocabulary rows and tying
    overridden when given (the widths, heads and rope settings always stay the published ones)."""
    import copy

    config = copy.deepcopy(base)
    published = dict(PUBLISHED_TEXT[size])
    published_tie = published.pop("tie_word_embeddings")
    tie = published_tie if tie_word_embeddings is None else tie_word_embeddings
    rope_theta = published.pop("rope_theta")
    text = config.text_config
    for name, value in published.items():
        setattr(text, name, value)
    if text_layers is not None:
        text.num_hidden_layers = text_layers
    if vocab_size is not None:
        text.vocab_size = vocab_size
    text.layer_types = ["full_attention"] * text.num_hidden_layers
    text.head_dim = text.hidden_size // text.num_attention_heads
    if text.head_dim == 128:
        section = list(MROPE_SECTION)
    else:  # the "test" shape: same proportions as the published sections
        section = [text.head_dim // 8, text.head_dim * 3 // 16, 0]
        section[-1] = text.head_dim // 2 - sum(section[:-1])
    text.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": section}
    text.tie_word_embeddings = tie
    config.tie_word_embeddings = tie

    vision = vision_shape(size)
    published_depth, published_full = vision["depth"], vision["fullatt_block_indexes"]
    if vision_depth is not None:
        vision["depth"] = vision_depth
        vision["fullatt_block_indexes"] = cut_full_attention_blocks(vision_depth, published_depth, published_full)
    for name, value in vision.items():
        setattr(config.vision_config, name, value)
    config.vision_config.out_hidden_size = text.hidden_size
    return config


def save_real_width_model(
    tiny_folder: Path,
    folder: Path,
    size: str,
    *,
    dtype: str = "bfloat16",
    device: str = "cpu",
    **cut: Any,
) -> Path:
    """Build Qwen2.5-VL of `size` (cut as `real_width_config` says) with random weights and save it as an ordinary
    model folder with the tiny model's tokenizer, processor and chat template. Reuses a complete folder."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    folder = Path(folder)
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return folder
    config = real_width_config(AutoConfig.from_pretrained(tiny_folder), size, **cut)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(folder)
    del model
    AutoProcessor.from_pretrained(tiny_folder).save_pretrained(folder)
    for extra in ("generation_config.json", "chat_template.jinja"):
        if (tiny_folder / extra).exists() and not (folder / extra).exists():
            (folder / extra).write_bytes((tiny_folder / extra).read_bytes())
    return folder


def parameter_counts(size: str) -> dict[str, int]:
    """Exact parameter counts of the full published model, per part, from a meta-device build (no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig

    config = real_width_config(Qwen2_5_VLConfig(), size)
    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(config)
    model.tie_weights()  # from_config on the meta device leaves a tied head untied until weights load
    counts = {"vision tower": 0, "language model": 0, "embeddings and LM head": 0}
    for name, parameter in model.named_parameters(remove_duplicate=True):
        if ".visual." in f".{name}":
            counts["vision tower"] += parameter.numel()
        elif "embed_tokens" in name or name.startswith("lm_head"):
            counts["embeddings and LM head"] += parameter.numel()
        else:
            counts["language model"] += parameter.numel()
    return counts
