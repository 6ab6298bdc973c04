"""Tuning strategies: which parts of the VLM learn (vision tower, projector, language model), how, and how fast.

A strategy is one row of `STRATEGIES`. `resolve_strategy` (a pure function) checks the recipe against the model's config
before any weights load; `apply_strategy` wraps and freezes the loaded model accordingly; `parameter_groups` gives the optimizer one
group per part (and per weight-decay class) with that part's learning rate.
"""

import re
from dataclasses import dataclass
from typing import Any

from vlm_recipes.compat import is_packed_4bit
from vlm_recipes.configs import ModelArguments, TuningArguments
from vlm_recipes.errors import RecipeError
from vlm_recipes.modeling.families import ModelFamily


PARTS = ("vision_tower", "projector", "language_model")
FROZEN, FULL, LORA, PARTIAL, FLAG = "frozen", "full", "lora", "partial", "flag"


@dataclass(frozen=True)
class Strategy:
    name: str
    vision_tower: str  # frozen | full
    projector: str  # frozen | full | flag (the recipe's `train_projector` decides)
    language_model: str  # frozen | full | lora | partial (first `llm_frozen_layers` layers frozen, the rest full)
    four_bit: bool = False

    @property
    def uses_lora(self) -> bool:
        return self.language_model == LORA


STRATEGIES = {
    strategy.name: strategy
    for strategy in (
        Strategy("qlora", vision_tower=FROZEN, projector=FLAG, language_model=LORA, four_bit=True),
        Strategy("lora", vision_tower=FROZEN, projector=FLAG, language_model=LORA),
        Strategy("lora_llm_full_vit", vision_tower=FULL, projector=FULL, language_model=LORA),
        Strategy("partial_llm_full_vit", vision_tower=FULL, projector=FULL, language_model=PARTIAL),
        Strategy("vit_only", vision_tower=FULL, projector=FULL, language_model=FROZEN),
        Strategy("projector_only", vision_tower=FROZEN, projector=FULL, language_model=FROZEN),
        Strategy("full", vision_tower=FULL, projector=FULL, language_model=FULL),
    )
}
PART_LEARNING_RATES = {
    "vision_tower": "learning_rate_vit",
    "projector": "learning_rate_projector",
    "language_model": "learning_rate_llm",
}


@dataclass(frozen=True)
class TuningPlan:
    """What the recipe asks of each part, checked against the model: `modes[part]` is frozen, full, lora or partial."""

    strategy: Strategy
    modes: dict[str, str]
    vision_lora_r: int | None
    llm_frozen_layers: int
    learning_rates: dict[str, float]  # per part, defaults filled in
    vit_unfreeze_ratio: float

    def trains(self, part: str) -> bool:
        return self.modes[part] != FROZEN or (part == "vision_tower" and self.vision_lora_r is not None)


def loads_in_4bit(settings: dict[str, Any]) -> bool:
    """Whether a recipe's fields (a saved `recipe.yaml`) load the base in 4 bit: a 4-bit `tuning_strategy` (qlora), else
    `load_in_4bit`."""
    strategy = STRATEGIES.get(settings.get("tuning_strategy") or "")
    return strategy.four_bit if strategy else bool(settings.get("load_in_4bit"))


def _strategy_from_legacy_fields(model_args: ModelArguments) -> str:
    if model_args.load_in_4bit:
        return "qlora"
    return "lora" if model_args.use_peft else "full"


def resolve_strategy(
    tuning: TuningArguments,
    model_args: ModelArguments,
    config: Any,
    family: ModelFamily,
    learning_rate: float,
    explicit_fields: set[str] | frozenset[str] = frozenset(),
) -> TuningPlan:
    """The checked plan for this model, from its config alone (before any weights load). Changes nothing it is given.

    Without `tuning_strategy`, `load_in_4bit` (qlora) or `use_peft` (lora) pick the strategy; `explicit_fields` (what
    the recipe set) lets a contradiction between those fields and a named strategy fail instead of being overridden
    (`modeling.setup` gives the loading code a copy of `model_args` with the strategy's values).
    """
    name = tuning.tuning_strategy or _strategy_from_legacy_fields(model_args)
    if name not in STRATEGIES:
        raise RecipeError(f"Unknown tuning_strategy '{name}'. Choose one of: {', '.join(STRATEGIES)}.")
    strategy = STRATEGIES[name]
    if tuning.tuning_strategy is not None:
        for field_name, wanted in (("load_in_4bit", strategy.four_bit), ("use_peft", strategy.uses_lora)):
            if field_name in explicit_fields and bool(getattr(model_args, field_name)) != wanted:
                raise RecipeError(
                    f"tuning_strategy '{name}' means `{field_name}: {str(wanted).lower()}`, but the recipe sets "
                    f"`{field_name}: {str(getattr(model_args, field_name)).lower()}`. Drop {field_name} (the strategy "
                    "decides) or pick the strategy that matches."
                )
    modes = {
        "vision_tower": strategy.vision_tower,
        "projector": (FULL if tuning.train_projector else FROZEN)
        if strategy.projector == FLAG
        else strategy.projector,
        "language_model": strategy.language_model,
    }
    if tuning.train_projector and strategy.projector != FLAG:
        raise RecipeError(
            f"`train_projector` applies to the lora and qlora strategies; '{name}' already sets the projector to "
            f"{strategy.projector}."
        )

    num_layers = config.get_text_config().num_hidden_layers
    if strategy.language_model == PARTIAL:
        if not 0 <= tuning.llm_frozen_layers <= num_layers:
            raise RecipeError(
                f"llm_frozen_layers is {tuning.llm_frozen_layers}, but {config.model_type} has {num_layers} "
                f"language-model layers: choose 0 to {num_layers}."
            )
    elif tuning.llm_frozen_layers:
        raise RecipeError(f"`llm_frozen_layers` applies to the partial_llm_full_vit strategy only, not '{name}'.")

    if tuning.vision_lora_r is not None:
        if strategy.vision_tower != FROZEN:
            raise RecipeError(
                f"`vision_lora_r` adds LoRA to a frozen vision tower; tuning_strategy '{name}' already trains the "
                "whole vision tower."
            )
        if not strategy.uses_lora:
            raise RecipeError("`vision_lora_r` needs a LoRA strategy (lora or qlora).")

    plan = TuningPlan(
        strategy=strategy,
        modes=modes,
        vision_lora_r=tuning.vision_lora_r,
        llm_frozen_layers=tuning.llm_frozen_layers,
        learning_rates={},
        vit_unfreeze_ratio=tuning.vit_unfreeze_ratio,
    )
    for part, field_name in PART_LEARNING_RATES.items():
        value = getattr(tuning, field_name)
        if value is not None and not plan.trains(part):
            raise RecipeError(
                f"`{field_name}` is set, but tuning_strategy '{name}' keeps the {part.replace('_', ' ')} frozen."
            )
        plan.learning_rates[part] = learning_rate if value is None else value
    if not 0.0 <= tuning.vit_unfreeze_ratio < 1.0:
        raise RecipeError("`vit_unfreeze_ratio` is a fraction of the training steps, from 0 up to (not including) 1.")
    if tuning.vit_unfreeze_ratio and modes["vision_tower"] != FULL:
        raise RecipeError(
            f"`vit_unfreeze_ratio` stages the unfreezing of a trained vision tower; '{name}' keeps it frozen."
        )
    return plan


# ---------------------------------------------------------------------------------------------------------------------
# Applying a plan to a loaded model


def _layer_index(name: str, family: ModelFamily) -> int | None:
    match = re.match(rf"{re.escape(family.language_model_layers)}\.(\d+)\.", family.canonical_name(name))
    return int(match.group(1)) if match else None


def _is_embedding(name: str) -> bool:
    return "embed_tokens" in name or name.endswith("embeddings.weight")


def _vision_linear_names(model: Any, family: ModelFamily) -> list[str]:
    import torch

    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and family.part_of(name) == "vision_tower"
    ]


def _savable_modules(model: Any, prefixes: tuple[str, ...]) -> list[str]:
    """Module names peft can save next to an adapter: a module list (Qwen3-VL's DeepStack mergers) by its members.

    A bare parameter (LLaVA-Next's `image_newline`) is no module, so it cannot be saved with an adapter: it stays frozen
    under the LoRA strategies.
    """
    import torch

    modules = dict(model.named_modules())
    names = []
    for prefix in prefixes:
        module = modules.get(prefix)
        if isinstance(module, torch.nn.ModuleList | torch.nn.ModuleDict):
            names += [f"{prefix}.{child}" for child, _ in module.named_children()]
        elif module is not None:
            names.append(prefix)
    return names


def _is_lora_target(targets: str | list[str] | tuple[str, ...] | set[str], name: str) -> bool:
    """peft's `target_modules` rule: a string is one regex over the full module name (TRL turns a one-item list, as the
    command line gives it, into that string); a list names modules by their name or its last dotted parts."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith(f".{target}") for target in targets)


def _lora_config(model: Any, plan: TuningPlan, model_args: ModelArguments, family: ModelFamily) -> Any:
    from peft import LoraConfig

    targets: Any = model_args.lora_target_modules or family.lora_target_regex()
    rank_pattern, alpha_pattern = {}, {}
    if plan.vision_lora_r is not None:
        llm_targets = [name for name, _ in model.named_modules() if _is_lora_target(targets, name)]
        if not llm_targets:
            raise RecipeError(
                f"`lora_target_modules` {targets!r} names no module of the model, so with `vision_lora_r` only the "
                "vision tower would get LoRA. Give module names (q_proj v_proj) or one regex over full module names."
            )
        targets = llm_targets + _vision_linear_names(model, family)
        vision_pattern = re.escape(family.vision_tower) + r"\..*"
        rank_pattern[vision_pattern] = plan.vision_lora_r
        alpha_pattern[vision_pattern] = 2 * plan.vision_lora_r
    # Parts trained in full next to the adapter are saved with it (peft's modules_to_save), so the adapter folder alone
    # restores them. A projector inside the vision tower is covered by the tower's entry.
    full_parts = [family.vision_tower] if plan.modes["vision_tower"] == FULL else []
    if plan.modes["projector"] == FULL:
        full_parts += [
            name
            for name in _savable_modules(model, family.projector)
            if not any(name.startswith(part + ".") for part in full_parts)
        ]
    return LoraConfig(
        task_type=model_args.lora_task_type,
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        # Fused expert weights of a mixture-of-experts model (3-D parameters, not nn.Linear), unless the recipe picks
        target_parameters=None if model_args.lora_target_modules else family.lora_target_parameters(model.config),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        modules_to_save=(model_args.lora_modules_to_save or []) + full_parts or None,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
        bias="none",
    )


def apply_strategy(model: Any, plan: TuningPlan, model_args: ModelArguments, family: ModelFamily) -> Any:
    """Wrap (LoRA) and freeze the loaded model so that exactly the plan's parts train."""
    if plan.strategy.uses_lora:
        from peft import get_peft_model

        return get_peft_model(model, _lora_config(model, plan, model_args, family))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(_trains_in_full(name, plan, family))
    return model


def _trains_in_full(name: str, plan: TuningPlan, family: ModelFamily) -> bool:
    part = family.part_of(name)
    if part == "other":
        return plan.modes["language_model"] == FULL
    mode = plan.modes[part]
    if mode == PARTIAL:
        layer = _layer_index(name, family)
        if layer is None:  # embeddings sit below the frozen layers; the final norm and the head above them
            return not (_is_embedding(name) and plan.llm_frozen_layers > 0)
        return layer >= plan.llm_frozen_layers
    return mode == FULL


# ---------------------------------------------------------------------------------------------------------------------
# Reporting and optimizer groups


def trainable_parameter_table(model: Any, family: ModelFamily) -> str:
    """Per part: trainable parameters, all parameters, and the trainable share, as a small text table."""
    totals: dict[str, list[int]] = {part: [0, 0] for part in (*PARTS, "other")}
    for name, parameter in model.named_parameters():
        if ".original_module." in name:
            continue  # peft's frozen original of a module trained in full: counted once, as its trained copy
        count = getattr(parameter, "ds_numel", None) or parameter.numel()  # ZeRO-3 loads weights as empty shards
        if is_packed_4bit(parameter):
            count *= 2  # 4-bit storage packs two weights per byte
        totals[family.part_of(name)][1] += count
        if parameter.requires_grad:
            totals[family.part_of(name)][0] += count
    rows = [f"{'part':<16}{'trainable':>14}{'total':>14}{'share':>9}"]
    for part, (trainable, total) in totals.items():
        if total:
            rows.append(f"{part.replace('_', ' '):<16}{trainable:>14,}{total:>14,}{trainable / total:>9.1%}")
    trainable, total = (sum(values) for values in zip(*totals.values()))
    rows.append(f"{'all':<16}{trainable:>14,}{total:>14,}{trainable / total:>9.1%}")
    return "\n".join(rows)


def _embedding_parameters(model: Any) -> set[str]:
    """Parameters of embedding tables, by module type (names differ across families: Gemma 4's `embed_vision` is a
    linear projector, Qwen3-VL's `pos_embed` and CLIP's `position_embedding` are tables)."""
    import torch

    return {
        f"{module_name}.{name}"
        for module_name, module in model.named_modules()
        if isinstance(module, torch.nn.Embedding)
        for name, _ in module.named_parameters(recurse=False)
    }


def _norm_parameters(model: Any) -> set[str]:
    """Parameters of normalisation layers, by module type: the Trainer finds norms by name ("layernorm", "norm", ...)
    and so misses Qwen2.5-VL's vision `norm1`/`norm2` and merger `ln_q`, or Gemma 4's audio `norm_pre_attn`."""
    return {
        f"{module_name}.{name}"
        for module_name, module in model.named_modules()
        if "Norm" in type(module).__name__
        for name, _ in module.named_parameters(recurse=False)
    }


def _no_weight_decay(name: str, decay_names: set[str], exempt: set[str]) -> bool:
    return name not in decay_names or "lora_" in name or name in exempt or _is_embedding(name)


def parameter_groups(
    model: Any, plan: TuningPlan, family: ModelFamily, weight_decay: float, decay_names: set[str]
) -> list[dict]:
    """One optimizer group per (part, decay) with the part's learning rate; LoRA, biases, norms, embeddings: no decay."""
    exempt = _embedding_parameters(model) | _norm_parameters(model)
    groups: dict[tuple[str, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        part = family.part_of(name)
        decay = not _no_weight_decay(name, decay_names, exempt)
        group = groups.setdefault(
            (part, decay),
            {
                "params": [],
                "names": [],
                "part": part,
                "lr": plan.learning_rates.get(part, plan.learning_rates["language_model"]),
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        group["params"].append(parameter)
        group["names"].append(name)
    return list(groups.values())
