"""Tiny random vision-language models, built offline from a family's config, saved as ordinary model folders.

Each tiny model has random weights, a small BPE tokenizer trained here that carries the family's real special tokens,
the family's real chat template and image-processor settings, and a config whose special-token ids come from that
tokenizer. Everything downstream loads it with `from_pretrained`, exactly as it loads a real checkpoint: the demo and
the tests run the product's real code paths on it.

    python -m vlm_recipes.testing.tiny_models --family qwen2_5_vl --output_dir .cache/tiny/qwen2_5_vl
"""

import argparse
import json
import random
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from vlm_recipes.cli import add_bool_option, command_parser
from vlm_recipes.errors import RecipeError, exit_on_recipe_error
from vlm_recipes.modeling.chat_templates import read_template


TINY_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
# SigLIP / CLIP / Gemma 4 vision towers (Qwen's name their fields differently)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
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
    if normalizer is not None:
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
    return read_template(f"trl:{name}")


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
        "Random weights, built by `python -m vlm_recipes.testing.tiny_models` for tests and demos. Not a trained model.\n",
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


def class_bpe_tokenizer(tokenizer_class: Any, special_tokens: list[str], **kwargs: Any) -> Any:
    """A tokenizer of `tokenizer_class` (a BPE class transformers rebuilds from vocab and merges on reload), trained
    with that class's own normalizer and pre-tokenizer, so that it encodes identically after a reload."""
    pipeline = tokenizer_class(vocab={"<|endoftext|>": 0}, merges=[]).backend_tokenizer
    vocab, merges = train_bpe(special_tokens, pipeline.normalizer, pipeline.pre_tokenizer)
    return tokenizer_class(vocab=vocab, merges=merges, **kwargs)


def qwen_tokenizer(tokenizer_class: Any = None, extra_tokens: tuple[str, ...] = ()) -> Any:
    """As the real Qwen-VL tokenizers: no BOS, <|im_end|> ends a turn, <|endoftext|> pads."""
    from transformers import Qwen2Tokenizer

    special_tokens = QWEN_SPECIAL_TOKENS + list(extra_tokens)
    return class_bpe_tokenizer(
        tokenizer_class or Qwen2Tokenizer,
        special_tokens,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in special_tokens if t not in ("<|im_end|>", "<|endoftext|>")],
    )


def qwen_special_ids(tokenizer: Any) -> dict[str, int]:
    """The Qwen-VL config fields that name special tokens, from the tiny tokenizer (the defaults sit near 151k)."""
    ids = check_token_ids(
        tokenizer,
        ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>", "<|im_end|>"],
    )
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def qwen_text_ids(tokenizer: Any) -> dict[str, int]:
    ids = check_token_ids(tokenizer, ["<|endoftext|>", "<|im_end|>"])
    return dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])


def qwen_generation(tokenizer: Any) -> dict[str, Any]:
    text = qwen_text_ids(tokenizer)
    return dict(
        bos_token_id=text["bos_token_id"],
        eos_token_id=[text["eos_token_id"], text["pad_token_id"]],
        pad_token_id=text["pad_token_id"],
    )


def build_and_save(
    output_dir: Path,
    model_class: Any,
    config: Any,
    processor: Any,
    generation: dict,
    seed: int,
    zero_initialised: tuple[str, ...] = (),
) -> None:
    """Random weights from `seed`; `zero_initialised` names parameters transformers initialises to zero where a trained
    checkpoint's are not (drawn like the others here, so images reach the language model and gradients the vision
    tower)."""
    import torch

    torch.manual_seed(seed)
    model = model_class(config)
    for name in zero_initialised:
        torch.nn.init.normal_(model.get_parameter(name), std=INIT_RANGE)
    save_tiny(output_dir, model, processor, generation)


def _qwen_vl(output_dir: Path, vocab_size: int | None, seed: int, *, version: str) -> None:
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
    head_dim = TINY_TEXT["hidden_size"] // TINY_TEXT["num_attention_heads"]
    config = Config(
        text_config=dict(
            **TINY_TEXT,
            vocab_size=vocab_size or len(tokenizer),
            max_position_embeddings=32768,
            initializer_range=INIT_RANGE,
            # mrope_section splits the rotary half-dimension over (time, height, width): it must sum to head_dim/2.
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
            **qwen_text_ids(tokenizer),
        ),
        vision_config=vision,
        **qwen_special_ids(tokenizer),
    )
    assert sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    build_and_save(output_dir, Model, config, processor, qwen_generation(tokenizer), seed)


register_tiny_builder("qwen2_5_vl")(partial(_qwen_vl, version="2.5"))
register_tiny_builder("qwen2_vl")(partial(_qwen_vl, version="2"))


# ---------------------------------------------------------------------------------------------------------------------
# Qwen3-VL, Qwen3-VL-MoE and Qwen3.5 (natively multimodal, hybrid linear/full attention)

QWEN3_EXTRA_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")
# Qwen3-VL-8B-Instruct preprocessor_config.json (Qwen3.5 ships the same): 16-pixel patches, merged 2x2, so one image
# token per 32x32 pixels, between 64 and 16,384 tokens.
QWEN3_IMAGE_PROCESSOR = dict(
    size={"shortest_edge": 65536, "longest_edge": 16777216},
    patch_size=16,
    temporal_patch_size=2,
    merge_size=2,
    image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5],
)
# Qwen3-VL's vision tower: 16-pixel patches; learned position embeddings on a square grid (num_position_embeddings is
# a perfect square, interpolated to each image); out_hidden_size feeds the language model.
QWEN3_VISION = dict(
    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TINY_TEXT["hidden_size"],
    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
)  # fmt: skip


def _qwen3(output_dir: Path, vocab_size: int | None, seed: int, *, variant: str) -> None:
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    text: dict[str, Any] = dict(**TINY_TEXT, head_dim=16, max_position_embeddings=32768, initializer_range=INIT_RANGE)
    vision = dict(QWEN3_VISION)
    if variant == "qwen3_5":
        # Qwen3.5: rotary on a quarter of each head (partial_rotary_factor 0.25), so mrope_section sums to
        # head_dim * 0.25 / 2; linear-attention (Gated DeltaNet) layers between full-attention ones (every 2nd here,
        # every 4th in the real checkpoints).
        text.update(
            head_dim=32,
            full_attention_interval=2,
            linear_conv_kernel_dim=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            rope_parameters={
                "rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True,
                "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
            },
        )  # fmt: skip
        tokenizer = qwen_tokenizer(transformers.Qwen3_5Tokenizer, QWEN3_EXTRA_TOKENS)
        chat_template = trl_chat_template("qwen3_5_think.jinja")  # Qwen3.5-4B and larger; <=2B ship the nothink one
        config_class, model_class = transformers.Qwen3_5Config, transformers.Qwen3_5ForConditionalGeneration
    else:
        # mrope_section splits the rotary half-dimension over (time, height, width), interleaved in Qwen3-VL
        text["rope_parameters"] = {
            "rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True, "rope_theta": 5000000.0,
        }  # fmt: skip
        vision["deepstack_visual_indexes"] = [0]  # DeepStack: features of these vision layers feed early LLM layers
        tokenizer = qwen_tokenizer(extra_tokens=QWEN3_EXTRA_TOKENS)
        chat_template = trl_chat_template("qwen3_vl.jinja")
        if variant == "qwen3_vl_moe":
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
            config_class, model_class = transformers.Qwen3VLMoeConfig, transformers.Qwen3VLMoeForConditionalGeneration
        else:
            config_class, model_class = transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration
    rope = text["rope_parameters"]
    assert sum(rope["mrope_section"]) == int(text["head_dim"] * rope.get("partial_rotary_factor", 1.0)) // 2

    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**QWEN3_IMAGE_PROCESSOR),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(),
        chat_template=chat_template,
    )
    config = config_class(
        text_config=dict(**text, vocab_size=vocab_size or len(tokenizer), **qwen_text_ids(tokenizer)),
        vision_config=vision,
        **qwen_special_ids(tokenizer),
    )
    build_and_save(output_dir, model_class, config, processor, qwen_generation(tokenizer), seed)


for _variant in ("qwen3_vl", "qwen3_vl_moe", "qwen3_5"):
    register_tiny_builder(_variant)(partial(_qwen3, variant=_variant))


# ---------------------------------------------------------------------------------------------------------------------
# Families whose real tokenizers transformers loads from tokenizer.json as is: a byte-level BPE in a
# PreTrainedTokenizerFast carries their special tokens (named ones through `extra_special_tokens`, so the processors
# find them as attributes after a reload).


def byte_level_tokenizer(
    special_tokens: list[str],
    *,
    eos_token: str,
    pad_token: str,
    bos_token: str | None = None,
    unk_token: str | None = None,
    add_bos: bool = False,
    named_tokens: dict[str, str] | None = None,
    **kwargs: Any,
) -> Any:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    vocab, merges = train_bpe(special_tokens, None, pre_tokenizer)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special_tokens])
    if add_bos:  # as Llama's and Gemma's tokenizers: BOS before every encoded text
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, vocab[bos_token])],
        )
    named = dict(named_tokens or {})
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        unk_token=unk_token,
        extra_special_tokens=named or None,
        **kwargs,
    )


def text_config_ids(tokenizer: Any) -> dict[str, int | None]:
    return dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )


def generation_ids(tokenizer: Any, end_of_turn: str | None = None) -> dict[str, Any]:
    """The generation config's token ids; generation also stops at the chat template's end-of-turn token."""
    ids = text_config_ids(tokenizer)
    if end_of_turn is not None:
        ids["eos_token_id"] = [ids["eos_token_id"], tokenizer.convert_tokens_to_ids(end_of_turn)]
    return ids


# ---------------------------------------------------------------------------------------------------------------------
# SmolVLM (Idefics3 architecture: SigLIP vision, pixel-shuffle connector, SmolLM2 language model)

SMOLVLM_TILE = 84  # the real SmolVLM-Instruct tiles images into 384-pixel squares; 84 keeps the tiny model small
SMOLVLM_SCALE_FACTOR = 3  # pixel shuffle: 3x3 patch features -> one image token (as the real model)


@register_tiny_builder("smolvlm")
def build_smolvlm(output_dir: Path, vocab_size: int | None = None, seed: int = 0) -> None:
    """As HuggingFaceTB/SmolVLM-Instruct (model type idefics3), scaled down: 84-pixel tiles of 6x6 patches, 4 tokens."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    row_col = [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<fake_token_around_image>",
               "<image>", "<global-img>", *row_col]  # fmt: skip
    tokenizer = byte_level_tokenizer(
        special, bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )  # fmt: skip
    patch_size = 14
    # The processor's image-token count per tile must equal the connector's output: (tile/patch)^2 / scale^2
    image_seq_len = (SMOLVLM_TILE // patch_size) ** 2 // SMOLVLM_SCALE_FACTOR**2
    processor = Idefics3Processor(
        # SmolVLM-Instruct preprocessor_config.json: images resized to a longest edge of 4 tiles, split into tiles
        # plus a global view, normalised to [-1, 1], Lanczos resampling
        image_processor=Idefics3ImageProcessor(
            do_image_splitting=True,
            size={"longest_edge": 4 * SMOLVLM_TILE},
            max_image_size={"longest_edge": SMOLVLM_TILE},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            resample=1,
        ),
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=trl_chat_template("smolvlm.jinja"),
    )
    ids = check_token_ids(tokenizer, ["<image>"])
    config = Idefics3Config(
        text_config=dict(
            model_type="llama",
            **TINY_TEXT,
            vocab_size=vocab_size or len(tokenizer),
            initializer_range=INIT_RANGE,
            rope_theta=273768.0,
            **text_config_ids(tokenizer),
        ),
        vision_config=dict(
            **TINY_VISION,
            image_size=SMOLVLM_TILE,
            patch_size=patch_size,
        ),
        scale_factor=SMOLVLM_SCALE_FACTOR,
        image_token_id=ids["<image>"],
        pad_token_id=tokenizer.pad_token_id,
    )
    build_and_save(output_dir, Idefics3ForConditionalGeneration, config, processor, generation_ids(tokenizer), seed)


# ---------------------------------------------------------------------------------------------------------------------
# LLaVA 1.5 and LLaVA-Next (CLIP vision, MLP projector, Vicuna / Mistral language model)

LLAVA_IMAGE_SIZE = 56  # the real checkpoints see 336x336 (24x24 patches); 56 gives 4x4 patches
LLAVA_PATCH_SIZE = 14
LLAVA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]


def llava_tokenizer() -> Any:
    # As llava-hf's Llama / Mistral tokenizers: BOS added to every text, </s> ends an answer, <pad> pads.
    return byte_level_tokenizer(
        LLAVA_SPECIAL_TOKENS, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", add_bos=True
    )


def _llava(output_dir: Path, vocab_size: int | None, seed: int, *, next_version: bool) -> None:
    import transformers

    tokenizer = llava_tokenizer()
    image_size, patch_size = LLAVA_IMAGE_SIZE, LLAVA_PATCH_SIZE
    # llava-hf preprocessor_config.json: CLIP resize of the short side + centre crop, CLIP mean/std, bicubic
    image_settings = dict(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=3,
    )
    text = dict(**TINY_TEXT, vocab_size=vocab_size or len(tokenizer), initializer_range=INIT_RANGE)
    vision = dict(
        model_type="clip_vision_model", **TINY_VISION, image_size=image_size, patch_size=patch_size, projection_dim=32,
    )  # fmt: skip
    # The real models drop CLIP's class token ("default" strategy) and read the second-to-last vision layer.
    common = dict(
        vision_config=vision,
        image_token_index=check_token_ids(tokenizer, ["<image>"])["<image>"],
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    processor_settings = dict(
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token
    )
    if next_version:
        # llava-v1.6-mistral-7b-hf's AnyRes resolutions, scaled from 336 to the tiny image size
        pinpoints = [[image_size * h, image_size * w] for h, w in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]
        processor = transformers.LlavaNextProcessor(
            image_processor=transformers.LlavaNextImageProcessor(**image_settings, image_grid_pinpoints=pinpoints),
            chat_template=trl_chat_template("llava_next.jinja"),
            **processor_settings,
        )
        config = transformers.LlavaNextConfig(
            text_config=dict(model_type="mistral", **text, **text_config_ids(tokenizer)),
            image_grid_pinpoints=pinpoints,
            **common,
        )
        model_class = transformers.LlavaNextForConditionalGeneration
    else:
        processor = transformers.LlavaProcessor(
            image_processor=transformers.CLIPImageProcessor(**image_settings),
            chat_template=read_template("vlm_recipes:llava_1_5.jinja"),  # llava-hf/llava-1.5-7b-hf's own template
            **processor_settings,
        )
        config = transformers.LlavaConfig(
            text_config=dict(model_type="llama", **text, **text_config_ids(tokenizer)), **common
        )
        model_class = transformers.LlavaForConditionalGeneration
    build_and_save(output_dir, model_class, config, processor, generation_ids(tokenizer), seed)


register_tiny_builder("llava")(partial(_llava, next_version=False))
register_tiny_builder("llava_next")(partial(_llava, next_version=True))


# ---------------------------------------------------------------------------------------------------------------------
# Gemma 3 (SigLIP vision, pooled to a fixed number of soft tokens) and Gemma 4 (variable-resolution vision, audio)

GEMMA3_IMAGE_SIZE = 56  # the real checkpoints see 896x896 (64x64 patches pooled to 16x16 = 256 tokens)
GEMMA3_TOKENS_PER_IMAGE = 4  # 4x4 patches pooled to 2x2: mm_tokens_per_image must be a perfect square


@register_tiny_builder("gemma3")
def build_gemma3(output_dir: Path, vocab_size: int | None = None, seed: int = 0) -> None:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", *named.values()]
    tokenizer = byte_level_tokenizer(
        special, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", add_bos=True,
        named_tokens=named,
    )  # fmt: skip
    processor = Gemma3Processor(
        # google/gemma-3-4b-it preprocessor_config.json: a fixed square resize, [-1, 1] normalisation, bilinear,
        # pan-and-scan off
        image_processor=Gemma3ImageProcessor(
            size={"height": GEMMA3_IMAGE_SIZE, "width": GEMMA3_IMAGE_SIZE},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            resample=2,
            do_pan_and_scan=False,
        ),
        tokenizer=tokenizer,
        chat_template=trl_chat_template("gemma3.jinja"),
        image_seq_length=GEMMA3_TOKENS_PER_IMAGE,
    )
    ids = check_token_ids(tokenizer, list(named.values()) + ["<end_of_turn>"])
    config = Gemma3Config(
        text_config=dict(
            **TINY_TEXT,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=512,
            vocab_size=vocab_size or len(tokenizer),
            initializer_range=INIT_RANGE,
            **text_config_ids(tokenizer),
        ),
        vision_config=dict(
            **TINY_VISION,
            image_size=GEMMA3_IMAGE_SIZE,
            patch_size=14,
        ),
        mm_tokens_per_image=GEMMA3_TOKENS_PER_IMAGE,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    build_and_save(
        output_dir,
        Gemma3ForConditionalGeneration,
        config,
        processor,
        generation_ids(tokenizer, "<end_of_turn>"),
        seed,
        zero_initialised=("model.multi_modal_projector.mm_input_projection_weight",),
    )


# google/gemma-4-E2B-it tokenizer_config.json: the special tokens the processor and the chat template use, by name
GEMMA4_NAMED_TOKENS = {
    "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
    "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
    "sot_token": "<|turn>", "eot_token": "<turn|>", "soc_token": "<|channel>", "eoc_token": "<channel|>",
    "think_token": "<|think|>", "escape_token": '<|"|>', "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>", "stc_token": "<|tool_call>", "etc_token": "<tool_call|>",
    "std_token": "<|tool>", "etd_token": "<tool|>",
}  # fmt: skip
GEMMA4_SOFT_TOKENS = 70  # the smallest image budget the processor accepts (70, 140, 280, 560, 1120; real default 280)


def _gemma4(output_dir: Path, vocab_size: int | None, seed: int, *, moe: bool) -> None:
    """As google/gemma-4-E2B-it / E4B-it: vision and audio towers, per-layer embeddings (PLE), tied output head.
    `moe`: each decoder layer also has a router and fused experts beside its dense MLP, as google/gemma-4-26B-A4B
    (the same module tree otherwise, so one family row serves both)."""
    from transformers import (
        Gemma4AudioFeatureExtractor,
        Gemma4Config,
        Gemma4ForConditionalGeneration,
        Gemma4ImageProcessor,
        Gemma4Processor,
        Gemma4VideoProcessor,
    )

    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *GEMMA4_NAMED_TOKENS.values(), "<|video|>"]
    tokenizer = byte_level_tokenizer(
        special, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        named_tokens=GEMMA4_NAMED_TOKENS, mask_token="<mask>", padding_side="left",
    )  # fmt: skip
    # The processor needs its audio feature extractor and video processor even for images only. The image processor's
    # class defaults are the real checkpoints' settings (16-pixel patches pooled 3x3, no normalisation).
    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessor(max_soft_tokens=GEMMA4_SOFT_TOKENS),
        tokenizer=tokenizer,
        video_processor=Gemma4VideoProcessor(),
        chat_template=trl_chat_template("gemma4_v5.jinja"),  # google/gemma-4-E2B-it's current template
        image_seq_length=GEMMA4_SOFT_TOKENS,
    )
    ids = check_token_ids(tokenizer, [*GEMMA4_NAMED_TOKENS.values(), "<|video|>"])
    vocab = vocab_size or len(tokenizer)
    experts = dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32) if moe else {}
    config = Gemma4Config(
        text_config=dict(
            **TINY_TEXT,
            head_dim=16,
            global_head_dim=16,
            vocab_size=vocab,
            initializer_range=INIT_RANGE,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=512,
            # Per-layer embeddings: a (vocab x layers * width) table, here over the tiny vocabulary (262k rows real)
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=vocab,
            **experts,
            **text_config_ids(tokenizer),
        ),
        vision_config=dict(
            **TINY_VISION,
            num_key_value_heads=2,
            head_dim=16,
            patch_size=16,
            pooling_kernel_size=3,
            position_embedding_size=256,
        ),
        audio_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2),
        image_token_id=ids["<|image|>"],
        boi_token_id=ids["<|image>"],
        eoi_token_id=ids["<image|>"],
        video_token_id=ids["<|video|>"],
        audio_token_id=ids["<|audio|>"],
        boa_token_id=ids["<|audio>"],
        eoa_token_index=ids["<audio|>"],
    )
    build_and_save(
        output_dir, Gemma4ForConditionalGeneration, config, processor, generation_ids(tokenizer, "<turn|>"), seed
    )


register_tiny_builder("gemma4")(partial(_gemma4, moe=False))
# Not a family of its own: the gemma4 row's mixture-of-experts checkpoints (LoRA on the fused experts)
register_tiny_builder("gemma4_moe")(partial(_gemma4, moe=True))


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
def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("vlm-recipes tiny", "Build a tiny random vision-language model folder (offline).")
    parser.add_argument("--family", default="qwen2_5_vl", choices=sorted(TINY_BUILDERS), help="The model family.")
    parser.add_argument("--output_dir", required=True, help="The folder to write the model into.")
    parser.add_argument(
        "--vocab_size", type=int, default=None, help="Embedding rows (default: the tiny tokenizer's size)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    add_bool_option(parser, "--force", "Rebuild even if a tiny model is already there.")
    return parser


def cli(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    output_dir = Path(args.output_dir)
    if args.force and (output_dir / "TINY_MODEL.md").exists():
        import shutil

        shutil.rmtree(output_dir)
    path = build_tiny_model(args.family, output_dir, vocab_size=args.vocab_size, seed=args.seed)
    print(f"Tiny {args.family} model in {path}")


if __name__ == "__main__":
    cli()
