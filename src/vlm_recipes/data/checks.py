"""Check every formatted row before training, so a bad row fails in the first minute instead of at step 9,000.

For each row of each split:
- images: every image decodes in full; a non-RGB image (RGBA, palette with transparency, CMYK, 16-bit, ...) is
  converted to correct RGB, and a size the processor cannot take is fixed by resizing where that is safe
  (`vlm_recipes.data.images`), or the row is rejected;
- text: every message has a role and text blocks that are strings, every assistant turn says something and holds no
  image, no text carries a stray `<image>` placeholder or the model's own image token, and no text holds a special
  token of the tokenizer or chat template (`data.special_tokens`): such a row is rejected naming the token, or, with
  `special_tokens_in_text: escape`, its tokens are escaped to tokenize as plain text (counted as a fix);
- placeholders: every conversation of the row has one image block per image, and the chat template writes one
  placeholder per image;
- length: text plus image tokens (`vlm_recipes.data.lengths`) fit `max_length`; a longer row is dropped or its images
  downscaled until it fits (`too_long`), and is never truncated inside its image tokens.

Rejected rows are counted by reason, with example rows, in the run's `DataReport`; fixed rows are counted by fix. The
fixes are written into the returned datasets (only fixed images are re-encoded), so the model sees exactly the checked
RGB image at the checked size, whatever trainer or collator reads the data.

Rows are task-agnostic: anything `row_conversations` understands (SFT `messages`, preference `prompt` + `chosen` /
`rejected`, `prompt` + `completion`) with `images`. Entry points call `check_training_data` once.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset
from datasets.fingerprint import Hasher

from vlm_recipes.compat import dataset_fingerprint
from vlm_recipes.data.formatters import IMAGE_PLACEHOLDER
from vlm_recipes.data.images import (
    ImageProblem,
    SizePlan,
    SizeRule,
    decode_image,
    fixed_image_value,
    image_column,
    plan_size,
    rgb_conversion,
    scaled_plan,
    with_image_decoding,
)
from vlm_recipes.data.lengths import COMPLETION_COLUMNS, TokenCounter, row_conversations
from vlm_recipes.data.loading import DATA_SOURCE, SOURCE_ROW, has_stable_fingerprint
from vlm_recipes.data.report import DataReport
from vlm_recipes.data.special_tokens import escape_special_tokens, find_special_token, special_token_texts
from vlm_recipes.errors import DataError


CONVERSATION_COLUMNS = ("messages", "prompt", *COMPLETION_COLUMNS)
ROLES = {"system", "user", "assistant", "tool"}
CHECKS_VERSION = "2"  # part of the cache fingerprint: bump when the checks change what they keep or fix
PARALLEL_FROM_ROWS = 2000  # below this, starting worker processes costs more than it saves


@dataclass(frozen=True)
class CheckPolicy:
    """What the checks enforce: the processor's size rule, `max_length` and what happens to longer rows."""

    size_rule: SizeRule = SizeRule()
    max_length: int | None = None
    too_long: str = "drop"  # drop | downscale
    # Tokens each row needs beyond its own within `max_length`: GRPO's prompts leave room for `max_completion_length`.
    reserved_tokens: int = 0
    special_tokens: tuple[str, ...] = ()  # the tokenizer's and chat template's (`data.special_tokens`)
    escape_special_tokens: bool = False  # escape them in the text (else: reject the row)


@dataclass
class CheckedSplit:
    """A split after the checks: kept rows (fixes applied) and each kept row's token counts, in dataset order."""

    dataset: Dataset
    tokens: list[int] = field(default_factory=list)  # text + image tokens of the row's longest conversation
    image_tokens: list[int] = field(default_factory=list)


class RowProblem(ValueError):
    def __init__(self, message: str, reason: str, column: str | None):
        super().__init__(message)
        self.reason, self.column = reason, column


# ---------------------------------------------------------------------------------------------------------------------
# One row


def _check_text(row: dict[str, Any], stray_tokens: tuple[str, ...], special_tokens: tuple[str, ...] = ()) -> None:
    for column in CONVERSATION_COLUMNS:
        messages = row.get(column)
        if messages is None:
            continue
        if not isinstance(messages, list):
            raise RowProblem(
                f"should be a list of messages, got {type(messages).__name__}", "malformed messages", column
            )
        for turn, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise RowProblem(f"turn {turn} has no known role", "malformed messages", column)
            content = message.get("content")
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(blocks, list):
                raise RowProblem(f"turn {turn} has no content list", "malformed messages", column)
            texts = []
            for block in blocks:
                if not isinstance(block, dict) or block.get("type") not in {"text", "image"}:
                    raise RowProblem(
                        f"turn {turn} has a block that is neither text nor image", "malformed messages", column
                    )
                if block["type"] == "text":
                    text = block.get("text")
                    if not isinstance(text, str):
                        raise RowProblem(
                            f"turn {turn} has text of type {type(text).__name__} ({text!r:.40}); expected a string",
                            "text is not a string",
                            column,
                        )
                    for token in stray_tokens:
                        if token in text:
                            raise RowProblem(
                                f"turn {turn} ({message['role']}) has {token!r} in its text, where no image belongs "
                                "(placeholders become image blocks before this check); remove it, or set "
                                "`special_tokens_in_text: escape` to keep it as plain text",
                                f"stray image placeholder {token} in the text",
                                column,
                            )
                    token = find_special_token(text, special_tokens)
                    if token is not None:
                        effect = (
                            "the model would be trained to emit that control token"
                            if message["role"] == "assistant"
                            else "the model would read that control token, not the text"
                        )
                        raise RowProblem(
                            f"turn {turn} ({message['role']}) has {token!r} in its text, a special token of the "
                            f"model's tokenizer: {effect}. Remove it, or set `special_tokens_in_text: escape` to keep "
                            "it as plain text",
                            f"special token {token} in the text",
                            column,
                        )
                    texts.append(text)
            if message["role"] == "assistant" and any(
                isinstance(block, dict) and block.get("type") == "image" for block in blocks
            ):
                raise RowProblem(
                    f"turn {turn} (assistant) holds an image ({IMAGE_PLACEHOLDER} in an answer); images belong in the "
                    "turns before the answer, and their tokens are never learned",
                    "image in an assistant turn",
                    column,
                )
            if message["role"] == "assistant" and not "".join(texts).strip():
                raise RowProblem(f"turn {turn} (assistant) has no text", "empty answer", column)


def _conversation_column(row: dict[str, Any]) -> str:
    return "messages" if "messages" in row else "prompt"


def _check_placeholders(row: dict[str, Any], conversations: list[list[dict[str, Any]]], images: int) -> None:
    for messages in conversations:
        blocks = sum(
            isinstance(message.get("content"), list)
            and sum(isinstance(block, dict) and block.get("type") == "image" for block in message["content"])
            for message in messages
        )
        if blocks != images:
            raise RowProblem(
                f"has {blocks} image block(s) ({IMAGE_PLACEHOLDER} placeholders) but {images} image(s)",
                f"{IMAGE_PLACEHOLDER} placeholders do not match the images",
                _conversation_column(row),
            )


def _image_plans(
    values: list[Any], rule: SizeRule, counter: TokenCounter, column: str | None
) -> tuple[list[SizePlan], list[bool], list[str]]:
    plans, rewrites, notes = [], [], []
    for index, value in enumerate(values):
        try:
            image = decode_image(value)
            conversion = rgb_conversion(image)
            plan = plan_size(*image.size, rule)
            try:
                counter.image_tokens(*plan.target)
            except ValueError as error:  # the processor's own rule refuses a size our rule let through
                raise ImageProblem(
                    f"is {plan.target[0]}x{plan.target[1]} pixels, which the processor cannot take: {error}",
                    reason="image size the processor cannot take",
                ) from None
        except ImageProblem as problem:
            raise RowProblem(f"image {index} {problem}", problem.reason, column) from None
        plans.append(plan)
        rewrites.append(conversion is not None or plan.resized)
        notes.extend(note for note in (conversion, *plan.notes) if note)
    return plans, rewrites, notes


def _downscale_to_fit(
    plans: list[SizePlan], budget: int, rule: SizeRule, counter: TokenCounter
) -> list[SizePlan] | None:
    """The largest common downscale of the images whose tokens fit `budget`, or None if even the smallest do not."""

    def at(scale: float) -> tuple[int, list[SizePlan]]:
        scaled = [scaled_plan(plan, scale, rule) for plan in plans]
        return sum(counter.image_tokens(*plan.target) for plan in scaled), scaled

    tokens, best = at(0.0)
    if tokens > budget:
        return None
    low, high = 0.0, 1.0
    for _ in range(20):  # bisection on the scale: 1e-6 of the size, far below one pixel
        middle = (low + high) / 2
        tokens, scaled = at(middle)
        if tokens <= budget:
            low, best = middle, scaled
        else:
            high = middle
    return best


def check_row(row: dict[str, Any], counter: TokenCounter, policy: CheckPolicy, image_column: str | None) -> dict:
    """The verdict on one row: why it is rejected, or its token counts and the images' target sizes."""
    values = row.get(image_column) if image_column else None
    values = [] if values is None else values if isinstance(values, list) else [values]
    stray = tuple(token for token in (IMAGE_PLACEHOLDER, counter.image_token) if token)
    try:
        try:
            conversations = row_conversations(row)
        except ValueError as error:
            raise RowProblem(str(error), "no conversation", None) from None
        _check_text(row, stray, policy.special_tokens)
        _check_placeholders(row, conversations, len(values))
        plans, rewrites, notes = _image_plans(values, policy.size_rule, counter, image_column)
        counts = [counter.count(messages, [plan.target for plan in plans]) for messages in conversations]
        if any(count.placeholders != len(values) for count in counts):
            written = [count.placeholders for count in counts]
            raise RowProblem(
                f"the chat template wrote {written} image placeholder(s) for {len(values)} image(s)",
                f"{IMAGE_PLACEHOLDER} placeholders do not match the images",
                _conversation_column(row),
            )
        longest = max(counts, key=lambda count: count.total)
        if policy.max_length is not None and longest.total + policy.reserved_tokens > policy.max_length:
            budget = policy.max_length - policy.reserved_tokens - max(count.text for count in counts)
            fitted = (
                _downscale_to_fit(plans, budget, policy.size_rule, counter)
                if policy.too_long == "downscale" and plans and budget > 0
                else None
            )
            if fitted is None:
                how = ""
                if policy.too_long == "downscale":
                    how = " even with its images at the smallest size" if plans and budget > 0 else ", text alone"
                reserved = f" + {policy.reserved_tokens} for the completion" if policy.reserved_tokens else ""
                raise RowProblem(
                    f"is {longest.total} tokens ({longest.text} text + {longest.image} image){reserved}, longer "
                    f"than max_length {policy.max_length}{how}; it is skipped rather than cut inside its image tokens",
                    "longer than max_length",
                    _conversation_column(row),
                )
            plans = fitted
            rewrites = [True] * len(plans)
            notes.append("images downscaled to fit max_length")
            counts = [counter.count(messages, [plan.target for plan in plans]) for messages in conversations]
            longest = max(counts, key=lambda count: count.total)
    except RowProblem as problem:
        return _verdict(reason=problem.reason, message=str(problem), column=problem.column)
    except Exception as error:  # noqa: BLE001 - one odd row must be reported, not end the run with a traceback
        return _verdict(
            reason=f"could not be checked ({type(error).__name__})", message=f"{type(error).__name__}: {error}"
        )
    return _verdict(
        tokens=longest.total,
        image_tokens=longest.image,
        targets=[list(plan.target) for plan in plans],
        rewrites=rewrites,
        notes=sorted(set(notes)),
    )


def _verdict(
    reason: str | None = None,
    message: str | None = None,
    column: str | None = None,
    tokens: int = -1,
    image_tokens: int = 0,
    targets: list | None = None,
    rewrites: list | None = None,
    notes: list | None = None,
) -> dict[str, Any]:
    return {
        "reason": reason,
        "message": message,
        "column": column,
        "tokens": tokens,
        "image_tokens": image_tokens,
        "targets": targets or [],
        "rewrites": rewrites or [],
        "notes": notes or [],
    }


# ---------------------------------------------------------------------------------------------------------------------
# Whole splits


def _where(row_label: str | None, index: int) -> tuple[str, int]:
    label, _, number = (row_label or "").partition(" ")
    return (row_label, int(number)) if number.isdigit() else (f"row {index}", index)


def default_num_proc(rows: int, requested: int | None) -> int:
    if requested:
        return requested
    return min(os.cpu_count() or 1, 8) if rows >= PARALLEL_FROM_ROWS else 1


def _fingerprint(dataset: Dataset, counter: TokenCounter, policy: CheckPolicy, task: str) -> str:
    processor = counter.processor
    settings = (
        CHECKS_VERSION,
        task,
        dataset_fingerprint(dataset),
        type(processor).__name__,
        getattr(counter.tokenizer, "name_or_path", None),
        len(counter.tokenizer),
        repr(getattr(getattr(processor, "image_processor", None), "size", None)),
        counter.chat_template or getattr(processor, "chat_template", None),
        repr(policy),
    )
    return Hasher.hash(settings)


def _cache_file(dataset: Dataset, fingerprint: str) -> str | None:
    """Where a check's result on `dataset` is cached: datasets' own place for a dataset read from files (None); for one
    built in memory with a fingerprint derived from its sources (`data.loading.has_stable_fingerprint`: a JSONL file's
    rows), a file of that fingerprint in the datasets cache, so another process or the next run reads it instead of
    checking again; None (not cached) for other in-memory datasets."""
    if dataset.cache_files or not has_stable_fingerprint(dataset):
        return None
    folder = Path(datasets.config.HF_DATASETS_CACHE) / "vlm_recipes_checks"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"{fingerprint}.arrow")


def check_split(
    dataset: Dataset,
    split: str,
    report: DataReport,
    counter: TokenCounter,
    policy: CheckPolicy,
    num_proc: int | None = None,
) -> CheckedSplit:
    """Check every row of `split`: rejections and fixes go into `report`; returns the kept rows with fixes applied."""
    if len(dataset) == 0:
        return CheckedSplit(dataset)
    column = image_column(dataset)
    raw = with_image_decoding(dataset, column, decode=False)
    num_proc = default_num_proc(len(dataset), num_proc)
    escaped: list[list[str]] | None = None
    if policy.escape_special_tokens and policy.special_tokens:
        raw = raw.map(
            _escape_row,
            fn_kwargs={"tokens": (IMAGE_PLACEHOLDER, *policy.special_tokens)},
            num_proc=num_proc if num_proc > 1 else None,
            new_fingerprint=(fingerprint := _fingerprint(raw, counter, policy, "escaped")),
            cache_file_name=_cache_file(raw, fingerprint),
            desc=f"Escaping special tokens in the text of {split} rows",
        )
        escaped = raw[ESCAPED_COLUMN]
        raw = raw.remove_columns(ESCAPED_COLUMN)
    verdicts = raw.map(
        check_row,
        fn_kwargs={"counter": counter, "policy": policy, "image_column": column},
        remove_columns=raw.column_names,
        num_proc=num_proc if num_proc > 1 else None,
        new_fingerprint=(fingerprint := _fingerprint(raw, counter, policy, "verdicts")),
        cache_file_name=_cache_file(raw, fingerprint),
        desc=f"Checking {split} rows (images, text, placeholders, lengths)",
    )
    labels = dataset[SOURCE_ROW] if SOURCE_ROW in dataset.column_names else [None] * len(dataset)
    # A mixture's rows name their source: a bad row is reported as "<source>: row 17", with the source's own path.
    origins = dataset[DATA_SOURCE] if DATA_SOURCE in dataset.column_names else [None] * len(dataset)
    columns = verdicts.to_dict()  # small columns only: read once, not row by row
    kept, fixes = [], {}
    checked = CheckedSplit(dataset)
    for index, (label, origin) in enumerate(zip(labels, origins, strict=True)):
        verdict = {name: values[index] for name, values in columns.items()}
        if not report_verdict(report, split, verdict, label, index, origin, escaped[index] if escaped else ()):
            continue
        if any(verdict["rewrites"]):
            fixes[len(kept)] = (verdict["targets"], verdict["rewrites"])
        kept.append(index)
        checked.tokens.append(verdict["tokens"])
        checked.image_tokens.append(verdict["image_tokens"])

    result = raw.select(kept) if len(kept) < len(raw) else raw
    if fixes:
        result = result.map(
            _apply_fixes,
            fn_kwargs={"fixes": fixes, "column": column},
            with_indices=True,
            input_columns=[column],
            num_proc=num_proc if num_proc > 1 and len(fixes) >= PARALLEL_FROM_ROWS else None,
            new_fingerprint=(fingerprint := _fingerprint(result, counter, policy, "fixes")),
            cache_file_name=_cache_file(result, fingerprint),
            desc=f"Converting and resizing {len(fixes)} {split} row(s) whose images needed it",
        )
    checked.dataset = with_image_decoding(result, column, decode=True)
    return checked


def report_verdict(
    report: DataReport,
    split: str,
    verdict: dict[str, Any],
    label: str | None,
    index: int,
    origin: str | None,
    escaped: Any = (),
) -> bool:
    """Count one row's verdict in `report` under `split` (a rejection naming its source, row and column, or its fixes);
    whether the row is kept. `label` is its `SOURCE_ROW` ("line 18"), `origin` its mixture source or None."""
    where, number = _where(label, index)
    row_label = where.split(" ")[0]
    if origin is not None:
        where = f"{origin}: {where}"
    if verdict["reason"] is not None:
        message = DataError(
            verdict["message"],
            source=report.sources.get(origin, report.splits[split].source),
            row=number,
            column=verdict["column"],
            row_label=row_label,
        )
        report.reject(split, where, verdict["reason"], str(message))
        return False
    for note in verdict["notes"]:
        report.fix(split, where, note)
    for token in escaped:
        report.fix(split, where, f"special token {token} escaped as plain text")
    return True


def check_streamed_row(
    row: dict[str, Any], counter: TokenCounter, policy: CheckPolicy
) -> tuple[dict[str, Any] | None, dict[str, Any], list[str]]:
    """One streamed row through the checks `check_split` runs on a whole split (`check_row`, the same escaping and
    fixes): (the row with its fixes applied and its images decoded, or None when rejected; the verdict; the special
    tokens escaped). `report_verdict` counts the verdict."""
    column = next((name for name in ("images", "image") if name in row), None)
    escaped: list[str] = []
    if policy.escape_special_tokens and policy.special_tokens:
        changed = _escape_row(row, (IMAGE_PLACEHOLDER, *policy.special_tokens))
        escaped = changed.pop(ESCAPED_COLUMN)
        row = {**row, **changed}
    verdict = check_row(row, counter, policy, column)
    if verdict["reason"] is not None or column is None or row[column] is None:
        return (None if verdict["reason"] is not None else row), verdict, escaped
    fixes = {0: (verdict["targets"], verdict["rewrites"])} if any(verdict["rewrites"]) else {}
    values = _apply_fixes(row[column], 0, fixes, column)[column]
    decoded = [decode_image(value) for value in values] if isinstance(values, list) else decode_image(values)
    return {**row, column: decoded}, verdict, escaped


ESCAPED_COLUMN = "_escaped_special_tokens"


def _escape_row(row: dict[str, Any], tokens: tuple[str, ...]) -> dict[str, Any]:
    """The row's conversation columns with special tokens escaped in every text block, and which tokens were."""
    found: list[str] = []
    changed = {}
    for column in CONVERSATION_COLUMNS:
        messages = row.get(column)
        if not isinstance(messages, list):
            continue
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            blocks = content if isinstance(content, list) else []
            for block in blocks:
                if isinstance(block, dict) and isinstance(block.get("text"), str):
                    block["text"], tokens_here = escape_special_tokens(block["text"], tokens)
                    found += [token for token in tokens_here if token not in found]
            if isinstance(content, str):
                message["content"], tokens_here = escape_special_tokens(content, tokens)
                found += [token for token in tokens_here if token not in found]
        changed[column] = messages
    return {**changed, ESCAPED_COLUMN: found}


def _apply_fixes(values: Any, index: int, fixes: dict[int, tuple[list, list]], column: str) -> dict[str, Any]:
    if index not in fixes:
        return {column: values}
    targets, rewrites = fixes[index]
    many = isinstance(values, list)
    values = values if many else [values]
    fixed = [
        fixed_image_value(value, tuple(target)) if rewrite else value
        for value, target, rewrite in zip(values, targets, rewrites)
    ]
    return {column: fixed if many else fixed[0]}


def check_datasets(
    splits: dict[str, Dataset],
    report: DataReport,
    counter: TokenCounter,
    policy: CheckPolicy,
    num_proc: int | None = None,
) -> dict[str, CheckedSplit]:
    """`check_split` for each split (split names as in `report`: "train", "eval")."""
    return {
        name: check_split(dataset, name, report, counter, policy, num_proc)
        for name, dataset in splits.items()
        if dataset is not None
    }


def check_policy(
    processor: Any,
    args: Any,
    max_length: int | None,
    chat_template: str | None = None,
    reserved_tokens: int = 0,
) -> CheckPolicy:
    """The policy a recipe asks for: `args` is its `ReliabilityArguments`; `chat_template`, a training template the
    trainer uses instead of the processor's (its tokens count as the template's too); `reserved_tokens`, what each row
    must leave free within `max_length` (GRPO's completions)."""
    return CheckPolicy(
        size_rule=SizeRule.for_processor(processor, args.min_image_side),
        max_length=max_length,
        too_long=args.too_long,
        reserved_tokens=reserved_tokens,
        special_tokens=special_token_texts(processor, getattr(processor, "chat_template", None), chat_template),
        escape_special_tokens=args.special_tokens_in_text == "escape",
    )


def check_training_data(
    train: Dataset | None,
    evaluation: Dataset | None,
    report: DataReport,
    processor: Any,
    args: Any,
    max_length: int | None,
    num_proc: int | None = None,
    reserved_tokens: int = 0,
) -> tuple[Dataset, Dataset | None]:
    """The one call an entry point makes: check train and eval rows, return them with bad rows out and fixes in.

    `args` is the recipe's `ReliabilityArguments` (nothing is checked when `check_data` is off); `reserved_tokens`
    the tokens each row must leave free within `max_length` (GRPO's `max_completion_length`). Publish `report`
    afterwards. The results are cached by fingerprint in the datasets cache: under several processes the caller runs
    this on the main process first (`vlm_recipes.processes.main_process_first`), and the others reuse its results.
    """
    if not args.check_data:
        return train, evaluation
    counter = TokenCounter(processor)
    policy = check_policy(processor, args, max_length, reserved_tokens=reserved_tokens)
    checked = check_datasets(
        {"train": train, "eval": evaluation}, report, counter, policy, args.check_num_proc or num_proc
    )
    return tuple(checked[name].dataset if name in checked else None for name in ("train", "eval"))
