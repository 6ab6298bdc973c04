"""Tasks: one module per kind of evaluation data, each holding its formatter default, prompt presets, metrics,
answer length and card text (see `tasks.base.Task`). A recipe picks one with `task:`.

    from vlm_recipes.tasks import get_task
    task = get_task("chartqa")
    task.score(prediction, row).values   # {"relaxed_accuracy": 1.0, "relaxed_accuracy_normalized": 1.0, ...}

Adding a task is adding a module that builds a `Task` and one line in `TASKS` below.
"""

from vlm_recipes.errors import RecipeError
from vlm_recipes.tasks.base import RECIPE_PRESET, PromptPreset, RowScore, Task
from vlm_recipes.tasks.chartqa import CHARTQA
from vlm_recipes.tasks.conversation import CONVERSATION
from vlm_recipes.tasks.docvqa import DOCVQA, INFOVQA
from vlm_recipes.tasks.multiple_choice import MULTIPLE_CHOICE
from vlm_recipes.tasks.vqa import TEXTVQA, VQAV2


__all__ = ["RECIPE_PRESET", "TASKS", "PromptPreset", "RowScore", "Task", "get_task", "task_for_formatter"]

# In order of preference where several tasks read data with the same formatter (`task_for_formatter`).
TASKS: dict[str, Task] = {
    task.name: task for task in (CHARTQA, DOCVQA, INFOVQA, TEXTVQA, VQAV2, MULTIPLE_CHOICE, CONVERSATION)
}
DEFAULT_TASK = CHARTQA.name


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise RecipeError(f"Unknown task '{name}'. Choose one of: {', '.join(TASKS)}.")
    return TASKS[name]


def task_for_formatter(formatter: str) -> Task | None:
    """The task a recipe means when it names only a formatter: the first task whose default formatter it is."""
    return next((task for task in TASKS.values() if task.formatter == formatter), None)
