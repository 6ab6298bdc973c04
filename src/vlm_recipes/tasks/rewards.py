"""GRPO's rewards: a task's own metrics, scored against each row's reference answers exactly as `evaluate` scores
them, and `answer_format`, whether a completion has the form the task's answers take.

    rewards = reward_functions(get_task("chartqa"), ["relaxed_accuracy", "answer_format"])
    GRPOTrainer(..., reward_funcs=rewards)

Each reward is a callable TRL's `GRPOTrainer` calls with the generation batch: `prompts`, `completions` (conversational:
one assistant message each) and every other column of the rows as lists (`answers`, `question`, `options`, ...); it
returns one float per completion. Its `__name__` is the name TRL logs it under (`rewards/<name>/mean`).
"""

import re
from collections.abc import Callable
from typing import Any

from vlm_recipes.errors import RecipeError
from vlm_recipes.tasks.base import Task, message_text


FORMAT_REWARD = "answer_format"
DEFAULT_FORMAT_WEIGHT = 0.25  # the format helps the answer along; it never outweighs being right

# Metrics where less is better: a reward must grow with what the run should learn.
LOWER_IS_BETTER = frozenset({"unparsed"})

# Answers of the short-answer tasks: "a single word or phrase" (the lmms-eval and VLMEvalKit instruction), one line.
SHORT_ANSWER_MAX_WORDS = 5
UNDECODABLE = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to
OPTION_LETTER = re.compile(r"\(?([A-Z])\)?\.?")
# The tasks whose answers are one option's letter, and those whose answers are free text of any length.
LETTER_ANSWER_TASKS = frozenset({"multiple_choice"})
FREE_TEXT_TASKS = frozenset({"conversation"})
# Row columns TRL adds to a reward call that are not the row's own.
TRAINER_ARGUMENTS = ("trainer_state", "log_extra", "log_metric", "environments", "completion_ids", "images", "image")


def completion_text(completion: Any) -> str:
    """The text of one completion: conversational (a list of messages) or plain."""
    if isinstance(completion, str):
        return completion
    return " ".join(message_text(message) for message in completion if message.get("role") == "assistant")


def _rows(prompts: list[Any], columns: dict[str, Any]) -> list[dict[str, Any]]:
    """Each completion's row as the task's `score` reads it: its columns, and `messages` (prompt + reference answer)
    for the task helpers that read a conversation."""
    names = [name for name in columns if name not in TRAINER_ARGUMENTS and isinstance(columns[name], list)]
    rows = []
    for index, prompt in enumerate(prompts):
        row = {name: columns[name][index] for name in names}
        answers = row.get("answers") or []
        reference = [{"role": "assistant", "content": [{"type": "text", "text": str(answers[0])}]}] if answers else []
        row["messages"] = (list(prompt) if isinstance(prompt, list) else []) + reference
        rows.append(row)
    return rows


class MetricReward:
    """One metric of a task as a reward: the metric's value for the completion against the row's references."""

    def __init__(self, task: Task, metric: str):
        self.task, self.metric = task, metric
        self.__name__ = metric

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        rows = _rows(prompts, columns)
        return [
            float(self.task.score(completion_text(completion), row).values[self.metric])
            for completion, row in zip(completions, rows, strict=True)
        ]


def has_answer_form(task_name: str, answer: str, row: dict[str, Any]) -> bool:
    """Whether `answer` has the form the task's answers take: printable text (no control characters or undecodable
    bytes), and one option letter (of the row's options) for multiple choice; any text for conversations; else a
    short answer, one line of at most five words."""
    answer = answer.strip()
    if not answer or not answer.replace("\n", " ").isprintable() or UNDECODABLE in answer:
        return False
    if task_name in LETTER_ANSWER_TASKS:
        match = OPTION_LETTER.fullmatch(answer)
        return match is not None and ord(match.group(1)) - ord("A") < len(row.get("options") or [])
    if task_name in FREE_TEXT_TASKS:
        return True
    return "\n" not in answer and len(answer.split()) <= SHORT_ANSWER_MAX_WORDS


class AnswerFormatReward:
    """1.0 for a completion in the form the task's answers take (`has_answer_form`), else 0.0."""

    __name__ = FORMAT_REWARD

    def __init__(self, task: Task):
        self.task = task

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        rows = _rows(prompts, columns)
        return [
            float(has_answer_form(self.task.name, completion_text(completion), row))
            for completion, row in zip(completions, rows, strict=True)
        ]


def reward_names(task: Task) -> list[str]:
    """The rewards a recipe of this task may name."""
    return [name for name in task.metric_names if name not in LOWER_IS_BETTER] + [FORMAT_REWARD]


def default_rewards(task: Task) -> tuple[list[str], list[float]]:
    """The task's headline metric and the answer format, with their weights."""
    return [task.primary_metric, FORMAT_REWARD], [1.0, DEFAULT_FORMAT_WEIGHT]


def reward_functions(task: Task, names: list[str]) -> list[Callable[..., list[float]]]:
    """The reward callables for `names` (checked: each a rewardable metric of the task, or `answer_format`)."""
    allowed = reward_names(task)
    functions = []
    for name in names:
        if name not in allowed:
            why = " (lower is better: it cannot be a reward)" if name in LOWER_IS_BETTER else ""
            raise RecipeError(
                f"`reward_functions`: '{name}' is not a reward of task '{task.name}'{why}. Choose from: "
                f"{', '.join(allowed)}."
            )
        functions.append(AnswerFormatReward(task) if name == FORMAT_REWARD else MetricReward(task, name))
    if len(set(names)) != len(names):
        raise RecipeError(f"`reward_functions` names a reward twice: {', '.join(names)}.")
    return functions
