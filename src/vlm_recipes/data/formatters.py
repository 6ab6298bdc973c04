"""Formatters: one small pure function per dataset shape, from a dataset row to TRL's vision format.

SFT formatters (`task="sft"`) return `{"images": [...], "messages": [...]}`; preference formatters
(`task="preference"`, for DPO) return `{"images", "prompt", "chosen", "rejected"}`, where the three are lists of
messages. Each message's `content` is a list of `{"type": "image"}` / `{"type": "text", "text": ...}` blocks in
reading order, one image block per image. Images pass
through untouched (a PIL image, an encoded `{"bytes", "path"}` dict, or a file path), so formatting never decodes a
picture; `vlm_recipes.data.loading` casts the `images` column to an image feature afterwards. A formatter may add
`answers` (the reference answers, for evaluation) and the fields a task's prompt presets rebuild a prompt from
(`question`, and for multiple choice `options` and `hint`); the trainer ignores them.

Adding a dataset means adding one function here, decorated with `@register_formatter(...)`, and one test.
"""

import ast
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_recipes.errors import RecipeError


IMAGE_PLACEHOLDER = "<image>"
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class FormatError(ValueError):
    """A row this formatter cannot use. The loader adds the file and the row number to the message.

    `reason` is a short, stable category ("'query' is empty") under which the data report counts such rows; it defaults
    to the column and the message.
    """

    def __init__(self, message: str, column: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.column = column
        self.reason = reason or (f"'{column}' {message}" if column else message)


@dataclass(frozen=True)
class FormatterSpec:
    name: str
    function: Callable[..., dict[str, Any]]
    # Each entry is a group of alternatives: at least one column of every group must be present.
    required_columns: tuple[tuple[str, ...], ...]
    task: str  # "sft" or "preference"
    description: str


FORMATTERS: dict[str, FormatterSpec] = {}


def register_formatter(name: str, *, required_columns: tuple[tuple[str, ...], ...], task: str = "sft"):
    def decorate(function):
        FORMATTERS[name] = FormatterSpec(
            name=name,
            function=function,
            required_columns=required_columns,
            task=task,
            description=(function.__doc__ or "").strip().splitlines()[0],
        )
        return function

    return decorate


def get_formatter(name: str, task: str | None = None) -> FormatterSpec:
    names = sorted(spec.name for spec in FORMATTERS.values() if task is None or spec.task == task)
    if name not in FORMATTERS or (task is not None and FORMATTERS[name].task != task):
        raise RecipeError(f"Unknown formatter '{name}' for {task or 'this'} data. Choose one of: {', '.join(names)}.")
    return FORMATTERS[name]


# ---------------------------------------------------------------------------------------------------------------------
# Small pieces the formatters share


def text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def image_block() -> dict[str, Any]:
    return {"type": "image", "text": None}


def system_messages(system_prompt: str | None) -> list[dict[str, Any]]:
    return [{"role": "system", "content": [text_block(system_prompt)]}] if system_prompt else []


def require_text(row: dict[str, Any], column: str) -> str:
    """The row's text in `column`, stripped; a clear error if it is missing, empty or not text."""
    value = row.get(column)
    if value is None:
        raise FormatError("is missing", column=column)
    if not isinstance(value, str):
        raise FormatError(
            f"should be text, got {type(value).__name__} {value!r:.60}",
            column=column,
            reason=f"'{column}' is not text",
        )
    if not value.strip():
        raise FormatError("is empty", column=column)
    return value.strip()


def split_placeholders(text: str) -> list[dict[str, Any]]:
    """`"<image>What is this?"` -> `[image block, text block]`; text around each placeholder is kept in order."""
    blocks = []
    for index, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if index > 0:
            blocks.append(image_block())
        if piece.strip():
            blocks.append(text_block(piece.strip()))
    return blocks


def check_image_value(image: Any, column: str, index: int = 0) -> Any:
    """`image` if it can be an image: a file path, image bytes, an encoded `{"bytes", "path"}` dict or a decoded image
    (anything with a PIL-like `size` and `mode`); a number, another dict or a list is a row error naming the column."""
    if isinstance(image, str | bytes) or (hasattr(image, "size") and hasattr(image, "mode")):
        return image
    if isinstance(image, dict) and set(image) <= {"bytes", "path"}:
        if isinstance(image.get("bytes"), bytes) or isinstance(image.get("path"), str):
            return image
    raise FormatError(
        f"image {index} is {type(image).__name__} {image!r:.60}; expected a file path (or image bytes)",
        column=column,
        reason="image is not a path or an image",
    )


def resolve_image(image: Any, image_root: str | Path | None, column: str = "images", index: int = 0) -> Any:
    """A relative image path becomes absolute against `image_root`; other image values pass through. A value that
    cannot be an image is a row error (`check_image_value`)."""
    image = check_image_value(image, column, index)
    if isinstance(image, dict) and image.get("bytes") is None:
        image = image["path"]  # `{"path": ...}` in a JSONL row: a path like any other
    if isinstance(image, str):
        path = Path(image).expanduser()
        if not path.is_absolute() and image_root is not None:
            path = Path(image_root) / path
        return str(path)
    return image


def count_image_blocks(messages: list[dict[str, Any]]) -> int:
    return sum(block.get("type") == "image" for message in messages for block in message["content"])


# ---------------------------------------------------------------------------------------------------------------------
# SFT formatters


@register_formatter("chartqa", required_columns=(("image",), ("query",), ("label",)))
def chartqa(
    row: dict[str, Any], *, system_prompt: str | None = None, image_root: str | Path | None = None, **_: Any
) -> dict[str, Any]:
    """HuggingFaceM4/ChartQA rows (`image`, `query`, `label` as a list of strings): one question, one answer."""
    labels = row.get("label")
    if isinstance(labels, str | int | float):
        labels = [labels]
    if not isinstance(labels, list) or not labels:
        raise FormatError("should be a non-empty list of answers", column="label")
    answers = [str(label).strip() for label in labels if label is not None and str(label).strip()]
    if not answers:
        raise FormatError("holds no non-empty answer", column="label")
    if row.get("image") is None:
        raise FormatError("is missing", column="image")
    messages = [
        *system_messages(system_prompt),
        {"role": "user", "content": [image_block(), text_block(require_text(row, "query"))]},
        {"role": "assistant", "content": [text_block(answers[0])]},
    ]
    return {
        "images": [resolve_image(row["image"], image_root, "image")],
        "messages": messages,
        "answers": answers,
        "question": require_text(row, "query"),
    }


def _answer_texts(value: Any, column: str) -> list[str]:
    """Reference answers given as text, a list of texts, or a list of `{"answer": text}` (VQAv2), stripped; empty ones
    left out."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise FormatError("should be a non-empty list of answers", column=column)
    texts = [item.get("answer") if isinstance(item, dict) else item for item in value]
    answers = [str(text).strip() for text in texts if text is not None and str(text).strip()]
    if not answers:
        raise FormatError("holds no non-empty answer", column=column)
    return answers


@register_formatter("vqa", required_columns=(("image",), ("question",), ("answers",)))
def vqa(
    row: dict[str, Any], *, system_prompt: str | None = None, image_root: str | Path | None = None, **_: Any
) -> dict[str, Any]:
    """A question about an image with reference answers: DocVQA and InfographicVQA (`answers`: the accepted variants),
    TextVQA (the ten human answers), VQAv2 (`answers` as `{"answer": ...}` entries). Trains on the most frequent
    answer (the first of the most frequent ones)."""
    answers = _answer_texts(row.get("answers"), "answers")
    if row.get("image") is None:
        raise FormatError("is missing", column="image")
    question = require_text(row, "question")
    counts = Counter(answers)
    messages = [
        *system_messages(system_prompt),
        {"role": "user", "content": [image_block(), text_block(question)]},
        {"role": "assistant", "content": [text_block(max(answers, key=counts.__getitem__))]},
    ]
    return {
        "images": [resolve_image(row["image"], image_root, "image")],
        "messages": messages,
        "answers": answers,
        "question": question,
    }


MMMU_IMAGE_COLUMNS = tuple(f"image_{number}" for number in range(1, 8))


def _choice_options(row: dict[str, Any]) -> tuple[str, list[str]]:
    """(column, options): `options` or `choices`, as a list or as a list written out as text (MMMU)."""
    column = "options" if row.get("options") is not None else "choices"
    options = row.get(column)
    if isinstance(options, str):
        try:
            options = ast.literal_eval(options)
        except (ValueError, SyntaxError):
            raise FormatError(
                f"should be a list of options, got the text {options!r:.60}",
                column=column,
                reason=f"'{column}' is not a list",
            ) from None
    if not isinstance(options, list | tuple) or len(options) < 2:
        raise FormatError("should be a list of at least two options", column=column, reason=f"'{column}' malformed")
    texts = [str(option).strip() if option is not None else "" for option in options]
    if not all(texts):
        raise FormatError("holds an empty option", column=column, reason=f"empty option in '{column}'")
    if len(texts) > 26:
        raise FormatError("holds more than 26 options", column=column, reason=f"'{column}' malformed")
    return column, texts


def _answer_letter(answer: Any, count: int) -> str:
    """The answer as an option letter, from an index (ScienceQA: 1; AI2D: "1") or a letter (MMMU: "B")."""
    text = str(answer).strip() if answer is not None and not isinstance(answer, bool) else ""
    if text.isdigit() and int(text) < count:
        return chr(ord("A") + int(text))
    if len(text) == 1 and "A" <= text.upper() < chr(ord("A") + count):
        return text.upper()
    raise FormatError(
        f"should be an option index (0-{count - 1}) or letter (A-{chr(ord('A') + count - 1)}), got {answer!r:.40}",
        column="answer",
        reason="'answer' is not one of the options",
    )


@register_formatter("multiple_choice", required_columns=(("question",), ("options", "choices"), ("answer",)))
def multiple_choice(
    row: dict[str, Any], *, system_prompt: str | None = None, image_root: str | Path | None = None, **_: Any
) -> dict[str, Any]:
    """Multiple-choice questions: ScienceQA (`choices`, `answer` as an index, `hint`), AI2D (`options`, `answer` as an
    index written as text), MMMU (`options` written as a list in text, `answer` a letter, images in `image_1` ...
    `image_7`). The prompt lists the options as `A. ...`; the answer is the option's letter."""
    question = require_text(row, "question")
    _, options = _choice_options(row)
    letter = _answer_letter(row.get("answer"), len(options))
    image_columns = ("image",) if row.get("image") is not None else MMMU_IMAGE_COLUMNS
    images = [
        resolve_image(row[column], image_root, column) for column in image_columns if row.get(column) is not None
    ]
    hint = row.get("hint").strip() if isinstance(row.get("hint"), str) else ""
    lines = ([f"Context: {hint}"] if hint else []) + [question]
    lines += [f"{chr(ord('A') + index)}. {option}" for index, option in enumerate(options)]
    messages = [
        *system_messages(system_prompt),
        {"role": "user", "content": [*(image_block() for _ in images), text_block("\n".join(lines))]},
        {"role": "assistant", "content": [text_block(letter)]},
    ]
    return {
        "images": images,
        "messages": messages,
        "answers": [letter],
        "question": question,
        "options": options,
        "hint": hint,
    }


def _conversation_turns(row: dict[str, Any]) -> tuple[str, list[Any]]:
    column = "messages" if row.get("messages") is not None else "conversations"
    if row.get(column) is None:
        columns = ", ".join(sorted(key for key in row if row[key] is not None))
        raise FormatError(
            f"the row has neither 'messages' nor 'conversations' (its columns: {columns})",
            column="messages",
            reason="no 'messages' or 'conversations' in the row",
        )
    turns = row.get(column)
    if not isinstance(turns, list) or not turns:
        raise FormatError("should be a non-empty list of turns", column=column)
    return column, turns


def _turn_role_and_blocks(turn: Any, column: str, index: int) -> tuple[str, list[dict[str, Any]]]:
    if not isinstance(turn, dict):
        raise FormatError(
            f"turn {index} should be a mapping, got {type(turn).__name__}", column=column, reason="malformed turn"
        )
    raw_role = turn.get("role", turn.get("from"))
    role = ROLE_ALIASES.get(str(raw_role).lower())
    if role is None:
        raise FormatError(
            f"turn {index} has role {raw_role!r}; expected one of {sorted(ROLE_ALIASES)}",
            column=column,
            reason="unknown role",
        )
    content = turn.get("content", turn.get("value"))
    if isinstance(content, str):
        return role, split_placeholders(content)
    if isinstance(content, list):
        blocks = []
        for block in content:
            if isinstance(block, dict) and block.get("type") == "image":
                blocks.append(image_block())
            elif isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str):
                blocks.extend(split_placeholders(block["text"]))
            else:
                raise FormatError(
                    f"turn {index} has a content block {block!r:.80} that is neither text nor image",
                    column=column,
                    reason="malformed turn",
                )
        return role, blocks
    if content is not None:
        raise FormatError(
            f"turn {index} should hold text, got {type(content).__name__} {content!r:.40}",
            column=column,
            reason="turn is not text",
        )
    raise FormatError(f"turn {index} has no text (`content` or `value`)", column=column, reason="malformed turn")


@register_formatter("conversations", required_columns=(("messages", "conversations"),))
def conversations(
    row: dict[str, Any], *, system_prompt: str | None = None, image_root: str | Path | None = None, **_: Any
) -> dict[str, Any]:
    """A user's own conversations: `messages` (role/content) or LLaVA-style `conversations` (from/value), with
    `<image>` placeholders in the text and `images` (a list of paths) or `image` (one path)."""
    column, turns = _conversation_turns(row)
    messages = _messages_from_turns(turns, column)
    if not any(message["role"] == "assistant" for message in messages):
        raise FormatError("has no assistant turn to learn from", column=column)
    return {"images": _row_images(row, messages, column, image_root), "messages": with_system(messages, system_prompt)}


def _messages_from_turns(turns: list[Any], column: str, empty_reason: str | None = None) -> list[dict[str, Any]]:
    messages = []
    for index, turn in enumerate(turns):
        role, blocks = _turn_role_and_blocks(turn, column, index)
        if not blocks:
            raise FormatError(
                f"turn {index} ({role}) is empty", column=column, reason=empty_reason or f"empty {role} turn"
            )
        messages.append({"role": role, "content": blocks})
    return messages


def with_system(messages: list[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    """`messages` with the recipe's system prompt first, unless the row brings its own system turn."""
    if system_prompt and messages[0]["role"] != "system":
        return system_messages(system_prompt) + messages
    return messages


def _row_images(row: dict[str, Any], messages: list[dict[str, Any]], column: str, image_root: Any) -> list[Any]:
    """The row's `images` (a list) or `image` (one), resolved; one image per image block of `messages`."""
    image_column = "images" if row.get("images") is not None else "image"
    images = row.get(image_column)
    images = [] if images is None else images if isinstance(images, list) else [images]
    placeholders = count_image_blocks(messages)
    if placeholders != len(images):
        raise FormatError(
            f"has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in its text but {len(images)} image(s) in "
            f"'{image_column}'; put one {IMAGE_PLACEHOLDER} where each image belongs",
            column=column,
            reason=f"{IMAGE_PLACEHOLDER} placeholders do not match the images",
        )
    return [resolve_image(image, image_root, image_column, index) for index, image in enumerate(images)]


# ---------------------------------------------------------------------------------------------------------------------
# Preference formatters (DPO)
#
# They return TRL's conversational preference format: `{"images", "prompt", "chosen", "rejected"}`, where `prompt` is
# the conversation up to the answer (image blocks included) and `chosen`/`rejected` are the preferred and dispreferred
# assistant turns. TRL's vision collator repeats each row's images for the chosen and the rejected sequence.


def assistant_turn(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [text_block(text)]}


def check_distinct(chosen: Any, rejected: Any) -> None:
    """A pair whose answers are the same teaches nothing (its DPO gradient is zero): reject it."""
    if chosen == rejected:
        raise FormatError(
            "is identical to 'chosen'", column="rejected", reason="'chosen' and 'rejected' are identical"
        )


@register_formatter(
    "rlaif_v", required_columns=(("image",), ("question",), ("chosen",), ("rejected",)), task="preference"
)
def rlaif_v(row: dict[str, Any], *, system_prompt: str | None = None, **_: Any) -> dict[str, Any]:
    """openbmb/RLAIF-V-Dataset rows (`image`, `question`, `chosen`, `rejected` as text): one image, one question,
    a preferred and a dispreferred answer."""
    if row.get("image") is None:
        raise FormatError("is missing", column="image")
    question = split_placeholders(require_text(row, "question"))
    if count_image_blocks([{"content": question}]) == 0:
        question = [image_block(), *question]  # RLAIF-V questions carry no placeholder: the image comes first
    elif count_image_blocks([{"content": question}]) > 1:
        raise FormatError(
            f"has more than one {IMAGE_PLACEHOLDER} placeholder for its one image",
            column="question",
            reason=f"{IMAGE_PLACEHOLDER} placeholders do not match the images",
        )
    chosen, rejected = require_text(row, "chosen"), require_text(row, "rejected")
    check_distinct(chosen, rejected)
    prompt = with_system([{"role": "user", "content": question}], system_prompt)
    return {
        "images": [check_image_value(row["image"], "image")],
        "prompt": prompt,
        "chosen": [assistant_turn(chosen)],
        "rejected": [assistant_turn(rejected)],
    }


def _preference_messages(row: dict[str, Any], column: str, default_role: str) -> list[dict[str, Any]]:
    """A prompt or completion given as text or as a list of turns, as messages (an empty one is rejected)."""
    value = row.get(column)
    if value is None:
        raise FormatError("is missing", column=column)
    if isinstance(value, str):
        if not value.strip():
            raise FormatError("is empty", column=column)
        return [{"role": default_role, "content": split_placeholders(value)}]
    if not isinstance(value, list):
        raise FormatError(
            f"should be text or a list of turns, got {type(value).__name__}",
            column=column,
            reason=f"'{column}' is not text or turns",
        )
    if not value:
        raise FormatError("is empty", column=column)
    return _messages_from_turns(value, column, empty_reason=f"'{column}' is empty")


def _split_implicit_prompt(
    chosen: list[dict[str, Any]], rejected: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(prompt, chosen, rejected) from two full conversations: the turns they share are the prompt."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


@register_formatter("preference", required_columns=(("chosen",), ("rejected",)), task="preference")
def preference(
    row: dict[str, Any], *, system_prompt: str | None = None, image_root: str | Path | None = None, **_: Any
) -> dict[str, Any]:
    """Preference data already in conversational form (`prompt`, `chosen`, `rejected` as turns or text, with
    `images` or `image`), such as HuggingFaceH4/rlaif-v_formatted or a JSONL with image paths; without `prompt`, the
    turns `chosen` and `rejected` share are the prompt."""
    chosen = _preference_messages(row, "chosen", "assistant")
    rejected = _preference_messages(row, "rejected", "assistant")
    if row.get("prompt") is None:
        prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected)
        if not prompt:
            raise FormatError(
                "is missing, and 'chosen' and 'rejected' share no leading turns to take as the prompt",
                column="prompt",
                reason="'prompt' is missing",
            )
        if not chosen or not rejected:
            check_distinct(chosen, rejected)  # identical conversations leave no completion
            column = "chosen" if not chosen else "rejected"
            raise FormatError("has no answer after the prompt turns", column=column, reason=f"'{column}' is empty")
    else:
        prompt = _preference_messages(row, "prompt", "user")
    for column, completion in (("chosen", chosen), ("rejected", rejected)):
        if any(message["role"] != "assistant" for message in completion):
            raise FormatError(
                "should hold assistant turns only (the conversation before the answer belongs in 'prompt')",
                column=column,
                reason="non-assistant turn in a completion",
            )
        if count_image_blocks(completion):
            raise FormatError(
                "holds an image; images belong in 'prompt'", column=column, reason="image in a completion"
            )
    check_distinct(chosen, rejected)
    return {
        "images": _row_images(row, prompt, "prompt", image_root),
        "prompt": with_system(prompt, system_prompt),
        "chosen": chosen,
        "rejected": rejected,
    }


def find_matching_formatters(columns: list[str], task: str | None = None) -> list[str]:
    """Names of formatters whose required columns are all present in `columns`."""
    return sorted(
        spec.name
        for spec in FORMATTERS.values()
        if (task is None or spec.task == task)
        and all(any(column in columns for column in group) for group in spec.required_columns)
    )
