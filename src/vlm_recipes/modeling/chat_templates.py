"""Which chat template gives a family assistant-only loss, and how SFT uses it while the processor keeps its own.

Assistant-only loss needs a template with `{% generation %}` markers around what the model emits. TRL 1.16 ships such
training versions for most families and swaps one in itself when the processor's template is the byte-identical stock
one. Where TRL has none (Gemma 4) or its stock template never labels the end of a turn (LLaVA 1.5), the family row names
one of ours, in `vlm_recipes/chat_templates/`. Ours is used the way TRL uses its own: the collator renders with it, and
the processor keeps (and saves, with the adapter) the model's own template (`training.trainers.VLMSFTTrainer` swaps it
in with `processor_template_swapped` while TRL builds the collator, then hands it to the collator).
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vlm_recipes.errors import RecipeError
from vlm_recipes.modeling.families import ModelFamily


logger = logging.getLogger(__name__)

OUR_TEMPLATES = Path(__file__).resolve().parents[1] / "chat_templates"


def _trl_templates() -> Path:
    import trl

    return Path(trl.__file__).parent / "chat_templates"


def read_template(reference: str) -> str:
    """The text of "trl:<file>" (TRL's `chat_templates/`) or "vlm_recipes:<file>" (ours)."""
    source, _, name = reference.partition(":")
    folders = {"trl": _trl_templates, "vlm_recipes": lambda: OUR_TEMPLATES}
    if source not in folders or not name:
        raise ValueError(f"A chat template reference is 'trl:<file>' or 'vlm_recipes:<file>', not '{reference}'.")
    return (folders[source]() / name).read_text(encoding="utf-8")


def processor_template(processor: Any) -> str | None:
    """The processor's chat template (its `default` variant when it ships several)."""
    template = processor.chat_template
    return template.get("default") if isinstance(template, dict) else template


def _trl_training_template_name(template: str) -> str:
    for path in sorted(_trl_templates().glob("*_training.jinja")):
        if path.read_text(encoding="utf-8") == template:
            return path.name
    return "training template"


def choose_training_template(processor: Any, family: ModelFamily, args: Any) -> str | None:
    """Our training template for this processor, or None where TRL's own handling applies; logs which one trains.

    Raises a RecipeError, before any training, when assistant-only loss is asked for and no template can give it.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if not getattr(args, "assistant_only_loss", False):
        return None
    if getattr(args, "chat_template_path", None):
        logger.info("Assistant-only loss with the recipe's chat_template_path %s.", args.chat_template_path)
        return None
    template = processor_template(processor)
    if template is None:
        raise RecipeError(
            f"The processor of this {family.name} model has no chat template, so assistant-only loss cannot find the "
            "answers. Set `chat_template_path` to a template with {% generation %} markers, or "
            "`assistant_only_loss: false`."
        )
    reference = family.training_template
    if reference is not None and reference.startswith("vlm_recipes:"):
        ours = read_template(reference)
        file = reference.partition(":")[2]
        if template in {read_template(stock) for stock in family.stock_templates}:
            logger.info(
                "Assistant-only loss with vlm-recipes' %s (TRL has none for %s); the processor keeps its own template.",
                file,
                family.name,
            )
            return ours
        if has_generation_markers(template):
            logger.info("Assistant-only loss with the model's own chat template (it has generation markers).")
            return None
        logger.warning(
            "This %s model's chat template is not the stock one vlm-recipes' %s was written for; training with %s. "
            "Check that it renders conversations as the model's own template does.",
            family.name,
            file,
            file,
        )
        return ours
    if has_generation_markers(template):
        logger.info("Assistant-only loss with the model's own chat template (it has generation markers).")
        return None
    try:
        training_template = get_training_chat_template(processor)
    except ValueError:
        raise RecipeError(
            f"This {family.name} model's chat template is not the stock one TRL knows a training version of, so "
            "assistant-only loss cannot find the answers. Set `chat_template_path` to a template with "
            "{% generation %} markers, or `assistant_only_loss: false`."
        ) from None
    if reference is None:
        logger.info("%s has no training chat template in the family table.", family.name)
    logger.info(
        "Assistant-only loss with TRL's %s (TRL swaps it in for the stock template).",
        _trl_training_template_name(training_template),
    )
    return None


@contextmanager
def processor_template_swapped(processor: Any, template: str | None) -> Iterator[None]:
    """Within this block the processor carries `template` (our training template, so that TRL accepts the processor
    for assistant-only loss while it builds its collator); on exit its own template is back, which is what
    `save_model` and checkpoints save. `template` None: nothing changes."""
    if template is None:
        yield
        return
    own = processor.chat_template
    processor.chat_template = template
    try:
        yield
    finally:
        processor.chat_template = own
