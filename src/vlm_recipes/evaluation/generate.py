"""Batched greedy generation for formatted rows: by default the prompt is a row's conversation without its final
answer; a task's prompt preset can give another (`prompt=preset.messages`).

Rows are in the formatters' shape (`images`, `messages`). The prompt goes through the processor's own chat template with
the generation prompt added, the way TRL's collator builds training inputs (images put into the message blocks by
`trl.data_utils.prepare_multimodal_messages`), and a batch is padded on the left so every row's answer starts right
after its prompt. `prompt_lengths` gives each prompt's true token count (text and image tokens, from image headers
only), so that callers can batch rows of similar length and pad little.
"""

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from trl.data_utils import prepare_multimodal_messages

from vlm_recipes.data.images import ImageProblem, image_size
from vlm_recipes.data.lengths import TokenCounter, row_images
from vlm_recipes.tasks.base import prompt_messages


Prompt = Callable[[dict[str, Any]], list[dict[str, Any]]]


def conversation_prompt(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The recipe's own prompt: the row's conversation without its final answer."""
    return prompt_messages(row["messages"])


def _batches(rows: Sequence[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(rows), size):
        yield [rows[index] for index in range(start, min(start + size, len(rows)))]


def model_device(model: Any) -> torch.device:
    return next(parameter.device for parameter in model.parameters())


def greedy_generation_config(model: Any, processor: Any, max_new_tokens: int) -> Any:
    """Greedy decoding that stops at the model's end-of-turn tokens; sampling settings of the checkpoint are dropped."""
    from transformers import GenerationConfig

    own = getattr(model, "generation_config", None)
    tokenizer = getattr(processor, "tokenizer", processor)
    eos = getattr(own, "eos_token_id", None) or tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if isinstance(pad, list):
        pad = pad[0]
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,  # training may have turned the cache off for gradient checkpointing
        eos_token_id=eos,
        pad_token_id=pad,
    )


def encode_prompts(processor: Any, rows: Sequence[dict[str, Any]], prompt: Prompt = conversation_prompt) -> Any:
    """Left-padded model inputs for the prompts of `rows`."""
    conversations = [prepare_multimodal_messages(prompt(row), images=list(row.get("images") or [])) for row in rows]
    return processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        # The template already holds the special tokens; left padding puts every answer right after its prompt.
        processor_kwargs={"padding": True, "padding_side": "left", "add_special_tokens": False},
    )


@torch.no_grad()
def generate_answers(
    model: Any,
    processor: Any,
    rows: Sequence[dict[str, Any]],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    progress: bool = True,
    description: str = "Generating",
    prompt: Prompt = conversation_prompt,
) -> list[str]:
    """One greedy answer per row, in order, stripped of special tokens and surrounding whitespace."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    generation_config = greedy_generation_config(model, processor, max_new_tokens)
    device = model_device(model)
    answers: list[str] = []
    try:
        with tqdm(total=len(rows), desc=description, unit="row", disable=not progress) as bar:
            for batch in _batches(rows, max(1, batch_size)):
                inputs = encode_prompts(processor, batch, prompt).to(device)
                output = model.generate(**inputs, generation_config=generation_config)
                new_tokens = output[:, inputs["input_ids"].shape[1] :]
                answers.extend(text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True))
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return answers


def prompt_lengths(
    processor: Any, rows: Any, prompt: Prompt = conversation_prompt, chunk_rows: int = 256
) -> list[int]:
    """Each row's prompt in tokens (chat template text + image tokens), read without decoding any image: a
    `datasets.Dataset` is read as Arrow stores it. An image whose size cannot be read counts 0 tokens (generation
    reports it)."""
    counter = TokenCounter(processor)
    stored = rows.with_format("arrow") if hasattr(rows, "with_format") else None
    lengths: list[int] = []
    for start in range(0, len(rows), chunk_rows):
        stop = min(start + chunk_rows, len(rows))
        chunk = stored[start:stop].to_pylist() if stored is not None else [rows[i] for i in range(start, stop)]
        for row in chunk:
            try:
                sizes = [image_size(image) for image in row_images(row)]
            except ImageProblem:
                sizes = []
            lengths.append(counter.count(prompt(row), sizes).total)
    return lengths
