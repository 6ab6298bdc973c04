"""A row's true length in tokens, text plus image tokens, without running the model: THE one place it is computed.

The data checks (`max_length`), the preflight report (length distribution, padding share) and length-grouped batching
all use `TokenCounter`. Its count equals the number of non-padding tokens TRL's vision collator feeds the model for that
row (a test compares them):

- text: the conversation rendered by the processor's own chat template and tokenized as the collator does
  (`add_special_tokens=False`), minus the one placeholder token per image the template writes;
- images: what the processor expands each placeholder into, from its own resize rule
  (`compat.num_image_tokens`; Qwen-VL: one token per 28x28 pixels after `smart_resize`),
  or, for a processor without that rule, measured once per image size by running the processor on a blank image.

Only image sizes are needed, never pixels: `image_size` reads them from the file header.

A row may hold several conversations the model sees separately; `row_conversations` lists them: SFT `messages`;
preference `prompt` + `chosen` and `prompt` + `rejected`; prompt-completion `prompt` + `completion`. A row's length is
that of its longest conversation, each with all of the row's images.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vlm_recipes.compat import num_image_tokens
from vlm_recipes.data.images import image_size


COMPLETION_COLUMNS = ("chosen", "rejected", "completion")


def row_conversations(row: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The message lists the model sees for this row (one for SFT, two for preference pairs)."""
    if row.get("messages") is not None:
        return [row["messages"]]
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        completions = [row[column] for column in COMPLETION_COLUMNS if isinstance(row.get(column), list)]
        return [prompt + completion for completion in completions] or [prompt]
    raise ValueError(
        f"a row needs conversational `messages`, or `prompt` with `chosen`/`rejected`/`completion` (columns: "
        f"{', '.join(sorted(row))})"
    )


def row_images(row: dict[str, Any]) -> list[Any]:
    images = row.get("images", row.get("image"))
    if images is None:
        return []
    return images if isinstance(images, list) else [images]


@dataclass(frozen=True)
class TokenCount:
    text: int  # text tokens, template and special tokens included, image placeholders excluded
    image: int  # tokens the images expand into
    placeholders: int  # image placeholders the chat template wrote (one per image block)

    @property
    def total(self) -> int:
        return self.text + self.image


class TokenCounter:
    """Token counts of conversations and images for one processor (its chat template and image-size settings).

    `chat_template` overrides the processor's own (give the trainer's, when it swaps in a training template; TRL's
    training templates render the same text as the stock ones, so either gives the same count).
    """

    def __init__(self, processor: Any, chat_template: str | None = None):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.chat_template = chat_template
        self.image_token = getattr(processor, "image_token", None)
        self.image_token_id = getattr(processor, "image_token_id", None)
        if self.image_token_id is None and self.image_token is not None:
            self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self._image_tokens: dict[tuple[int, int], int] = {}

    # -- images ----------------------------------------------------------------------------------------------------

    def image_tokens(self, width: int, height: int) -> int:
        """Tokens one image of this size becomes. Raises `ValueError` for a size the processor cannot take."""
        key = (int(width), int(height))
        if key not in self._image_tokens:
            self._image_tokens[key] = self._compute_image_tokens(*key)
        return self._image_tokens[key]

    def _compute_image_tokens(self, width: int, height: int) -> int:
        tokens = num_image_tokens(self.processor, width, height)
        return tokens if tokens is not None else self._measured_image_tokens(width, height)

    def _measured_image_tokens(self, width: int, height: int) -> int:
        from PIL import Image

        if self.image_token is None:
            raise ValueError(f"{type(self.processor).__name__} names no image token to count")
        output = self.processor(
            text=[self.image_token], images=[Image.new("RGB", (width, height))], add_special_tokens=False
        )
        return len(output["input_ids"][0])

    # -- text ------------------------------------------------------------------------------------------------------

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The conversation as the chat template writes it (one placeholder token per image). A prompt without its
        answer (GRPO's rows) ends with the generation prompt, as the trainer renders it before generating."""
        awaits_answer = bool(messages) and messages[-1]["role"] != "assistant"
        return self.processor.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=awaits_answer
        )

    def text_tokens(self, messages: list[dict[str, Any]]) -> tuple[int, int]:
        """(text tokens without image placeholders, image placeholders written by the template)."""
        ids = self.tokenizer(self.render(messages), add_special_tokens=False)["input_ids"]
        placeholders = ids.count(self.image_token_id) if self.image_token_id is not None else 0
        return len(ids) - placeholders, placeholders

    # -- conversations and rows ------------------------------------------------------------------------------------

    def count(self, messages: list[dict[str, Any]], image_sizes: Sequence[tuple[int, int]] = ()) -> TokenCount:
        """Tokens of one conversation whose image blocks hold images of `image_sizes` ((width, height), in order)."""
        text, placeholders = self.text_tokens(messages)
        image = sum(self.image_tokens(width, height) for width, height in image_sizes)
        return TokenCount(text=text, image=image, placeholders=placeholders)

    def count_row(self, row: dict[str, Any], image_sizes: Sequence[tuple[int, int]] | None = None) -> TokenCount:
        """The row's longest conversation. Image sizes are read from the image headers unless given."""
        if image_sizes is None:
            image_sizes = [image_size(image) for image in row_images(row)]
        counts = [self.count(messages, image_sizes) for messages in row_conversations(row)]
        return max(counts, key=lambda count: count.total)

    def row_tokens(self, row: dict[str, Any]) -> int:
        """Total tokens of the row's longest conversation (for length-grouped batching and reports)."""
        return self.count_row(row).total

    def packed_row_tokens(self, row: dict[str, Any]) -> int:
        """Total tokens of all the row's conversations, each with the row's images: what packing puts in one
        sequence for it (a preference pair's chosen and rejected together)."""
        sizes = [image_size(image) for image in row_images(row)]
        return sum(self.count(messages, sizes).total for messages in row_conversations(row))


def dataset_token_lengths(
    dataset: Any, counter: TokenCounter, chunk_rows: int = 1000, all_conversations: bool = False
) -> list[int]:
    """`TokenCounter.row_tokens` of every row of a `datasets.Dataset` (`packed_row_tokens` with `all_conversations`),
    in order, reading image headers only.

    Rows are read as Arrow stores them (images as `{"bytes", "path"}`): nothing is decoded and, unlike casting the image
    column, no cache file is written, so every process of a launch can count on its own."""
    stored = dataset.with_format("arrow")
    lengths: list[int] = []
    for start in range(0, len(dataset), chunk_rows):
        count = counter.packed_row_tokens if all_conversations else counter.row_tokens
        lengths += [count(row) for row in stored[start : start + chunk_rows].to_pylist()]
    return lengths


# ---------------------------------------------------------------------------------------------------------------------
# What lengths mean for batches


def padding_share(lengths: Sequence[int], batch_size: int, order: Sequence[int] | None = None) -> float:
    """Padded positions / all positions when rows are batched in `order` (default: as given), each batch padded to its
    longest row (TRL's collators pad to the longest row of the batch)."""
    order = range(len(lengths)) if order is None else order
    real = padded = 0
    batch: list[int] = []
    for index in order:
        batch.append(lengths[index])
        if len(batch) == batch_size:
            real, padded = real + sum(batch), padded + max(batch) * len(batch)
            batch = []
    if batch:
        real, padded = real + sum(batch), padded + max(batch) * len(batch)
    return 1 - real / padded if padded else 0.0


def random_batching_padding_share(lengths: Sequence[int], batch_size: int, seed: int = 0, rounds: int = 5) -> float:
    """The padding share random batching carries, averaged over `rounds` shuffles."""
    import random

    rng = random.Random(seed)
    shares = []
    for _ in range(rounds):
        order = list(range(len(lengths)))
        rng.shuffle(order)
        shares.append(padding_share(lengths, batch_size, order))
    return sum(shares) / len(shares) if shares else 0.0


def percentile(values: Sequence[int], fraction: float) -> int:
    """The value below which `fraction` of `values` fall (nearest rank)."""
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]
