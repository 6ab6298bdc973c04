"""What a task is: the formatter it reads its data with, the prompts it can be asked in, its metrics, how long its
answers are, and how a model card describes it. Each module of this package defines tasks; nothing outside the package
names a task's metric.

A task reads rows in the formatters' shape (`images`, `messages`, and where the formatter gives them `answers`,
`question`, `options`, `hint`). The prompt a preset builds goes to generation; the references come from the row.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlm_recipes.data.formatters import image_block, text_block
from vlm_recipes.errors import RecipeError


RECIPE_PRESET = "recipe"


# ---------------------------------------------------------------------------------------------------------------------
# Reading formatted rows


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


def question_of(row: dict[str, Any]) -> str:
    """The row's question: the formatter's `question` when it gives one, else the text of the last user turn before
    the answer."""
    if row.get("question"):
        return str(row["question"])
    users = [message for message in prompt_messages(row["messages"]) if message["role"] == "user"]
    return message_text(users[-1]) if users else ""


def reference_answers(row: dict[str, Any]) -> list[str]:
    """A row's references: the formatter's `answers` when it gives them (ChartQA: every label; TextVQA: the ten human
    answers), else the conversation's final answer."""
    answers = row.get("answers")
    if answers:
        return [str(answer) for answer in answers]
    messages = row["messages"]
    return [message_text(messages[-1])] if messages and messages[-1]["role"] == "assistant" else []


def image_count(messages: list[dict[str, Any]]) -> int:
    return sum(
        block.get("type") == "image"
        for message in messages
        if not isinstance(message["content"], str)
        for block in message["content"]
    )


# ---------------------------------------------------------------------------------------------------------------------
# Prompts, metrics, scores


@dataclass(frozen=True)
class PromptPreset:
    """How a row is put to the model. `text` builds the whole user turn from the row's fields; without it the preset
    is the recipe's own prompt: the formatted conversation without its answer, system prompt included (what trained).

    A preset with `text` sends the row's images, then that text, in one user turn and no system message, as lmms-eval
    and VLMEvalKit do (the chat template's own default system prompt, if it has one, still applies)."""

    name: str
    source: str  # where the prompt comes from, so a reader can check it
    text: Callable[[dict[str, Any]], str] | None = None

    def messages(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        prompt = prompt_messages(row["messages"])
        if self.text is None:
            return prompt
        return [
            {
                "role": "user",
                "content": [*(image_block() for _ in range(image_count(prompt))), text_block(self.text(row))],
            }
        ]


RECIPE_PROMPT = PromptPreset(RECIPE_PRESET, source="the recipe's own prompt: the formatter's messages, as trained")

# The instruction lmms-eval (`post_prompt` of its chartqa, docvqa, infovqa, textvqa and vqav2 tasks) and VLMEvalKit
# (`ImageVQADataset.build_prompt`) append to a short-answer question.
SHORT_ANSWER_INSTRUCTION = "\nAnswer the question using a single word or phrase."


def short_answer_prompt(row: dict[str, Any]) -> str:
    return f"{row['question']}{SHORT_ANSWER_INSTRUCTION}"


@dataclass(frozen=True)
class Metric:
    name: str
    description: str  # what one row's value means, for the card and the docs
    compare_with: str  # which published figures this number can stand beside


@dataclass(frozen=True)
class RowScore:
    values: dict[str, float]  # metric -> this row's value (1.0 / 0.0 for a verdict)
    details: dict[str, Any] = field(default_factory=dict)  # more for the predictions file (e.g. the option read)


@dataclass(frozen=True)
class Task:
    """One kind of evaluation data, with everything that decides its numbers."""

    name: str
    title: str  # how people name the benchmark ("ChartQA")
    formatter: str  # the formatter a recipe of this task uses unless it names another
    metrics: tuple[Metric, ...]  # the first is the headline: summaries and `metric_for_best_model` examples use it
    max_new_tokens: int  # the answer length the reference harnesses generate up to
    presets: tuple[PromptPreset, ...]
    card_text: str  # one paragraph: how the numbers were computed and what they compare with
    hub_task_type: str  # the Hub's task id for `model-index`
    score: Callable[[str, dict[str, Any]], RowScore]  # (prediction, formatted row without images)

    @property
    def metric_names(self) -> list[str]:
        return [metric.name for metric in self.metrics]

    @property
    def primary_metric(self) -> str:
        return self.metrics[0].name

    def preset(self, name: str | None) -> PromptPreset:
        name = name or RECIPE_PRESET
        for preset in self.presets:
            if preset.name == name:
                return preset
        raise RecipeError(
            f"Task '{self.name}' has no prompt preset '{name}'. Its presets: "
            + ", ".join(preset.name for preset in self.presets)
            + "."
        )

    def aggregate(self, scores: Sequence[RowScore]) -> dict[str, float]:
        """Each metric's mean over rows (0 for no rows), plus the row count."""
        count = len(scores)
        means = {name: (sum(s.values[name] for s in scores) / count if count else 0.0) for name in self.metric_names}
        return {**means, "rows": count}


def best(values: Sequence[float]) -> float:
    """The best value over a row's references (0 when it has none)."""
    return max(values, default=0.0)
