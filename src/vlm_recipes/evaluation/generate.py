"""Batched greedy generation for formatted rows: the prompt is a row's conversation without its final answer.

Rows are in the formatters' shape (`images`, `messages`). The prompt goes through the processor's own chat template with
the generation prompt added, the way TRL's collator builds training inputs (images put into the message blocks by
`trl.data_utils.prepare_multimodal_messages`), and a batch is padded on the left so every row's answer starts right
after its prompt.
"""

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from trl.data_utils import prepare_multimodal_messages


def prompt_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation up to its final assistant turn (all of it when it ends on another turn)."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1]
    return list(messages)


def message_text(message: dict[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return " ".join(block["text"] for block in content if block.get("type") == "text" and block.get("text"))


def question_of(messages: list[dict[str, Any]]) -> str:
    """The text of the last user turn before the answer (what the predictions file shows as the question)."""
    users = [message for message in prompt_messages(messages) if message["role"] == "user"]
    return message_text(users[-1]) if users else ""


def reference_answers(row: dict[str, Any]) -> list[str]:
    """A row's labels: the formatter's `answers` when it gives them (ChartQA: every label), else the final answer."""
    answers = row.get("answers")
    if answers:
        return [str(answer) for answer in answers]
    messages = row["messages"]
    return [message_text(messages[-1])] if messages and messages[-1]["role"] == "assistant" else []


def _batches(rows: Sequence[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(rows), size):
        yield [rows[index] for index in range(start, min(start + size, len(rows)))]


def _model_device(model: Any) -> torch.device:
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


def encode_prompts(processor: Any, rows: Sequence[dict[str, Any]]) -> Any:
    """Left-padded model inputs for the prompts of `rows`."""
    conversations = [
        prepare_multimodal_messages(prompt_messages(row["messages"]), images=list(row.get("images") or []))
        for row in rows
    ]
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
) -> list[str]:
    """One greedy answer per row, in order, stripped of special tokens and surrounding whitespace."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    generation_config = greedy_generation_config(model, processor, max_new_tokens)
    device = _model_device(model)
    answers: list[str] = []
    try:
        with tqdm(total=len(rows), desc=description, unit="row", disable=not progress) as bar:
            for batch in _batches(rows, max(1, batch_size)):
                inputs = encode_prompts(processor, batch).to(device)
                output = model.generate(**inputs, generation_config=generation_config)
                new_tokens = output[:, inputs["input_ids"].shape[1] :]
                answers.extend(text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True))
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return answers
