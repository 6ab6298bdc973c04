"""The model side of a run, worked out once: the config (read once), the family row and the tuning plan, checked
against each other before any data or weights load. Everything downstream takes the resulting `ModelSetup`."""

import copy
import logging
from dataclasses import dataclass
from typing import Any

from vlm_recipes.configs import ModelArguments, TuningArguments
from vlm_recipes.errors import RecipeError
from vlm_recipes.modeling.base_model import load_config, load_processor
from vlm_recipes.modeling.families import ModelFamily, get_family
from vlm_recipes.modeling.strategies import TuningPlan, resolve_strategy


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSetup:
    """What a run trains and how, from the recipe and the model's config alone (no weights).

    `model_args` is a copy of the recipe's with `use_peft` and `load_in_4bit` as the tuning strategy says (the recipe's
    own fields stay as the user set them)."""

    model_args: ModelArguments
    config: Any
    family: ModelFamily
    plan: TuningPlan
    trust_remote_code: bool = False

    def load_processor(self) -> Any:
        """The model's processor, with the recipe's image-size bounds (`modeling.base_model.load_processor`)."""
        return load_processor(self.model_args, self.family, self.trust_remote_code)


def resolve_model_setup(
    model_args: ModelArguments,
    tuning: TuningArguments,
    learning_rate: float,
    explicit_fields: set[str] | frozenset[str] = frozenset(),
    trust_remote_code: bool = False,
) -> ModelSetup:
    """Config -> family row -> tuning plan -> the family's limits on the model settings. The first step of every
    training entry point (and of the preflight): a wrong path, an unsupported family, an impossible strategy or
    learning rate fails here. `explicit_fields` (what the recipe set) lets a contradiction between `use_peft` /
    `load_in_4bit` and the strategy fail instead of being overridden."""
    config = load_config(model_args, trust_remote_code)
    return setup_for_config(config, model_args, tuning, learning_rate, explicit_fields, trust_remote_code)


def setup_for_config(
    config: Any,
    model_args: ModelArguments,
    tuning: TuningArguments,
    learning_rate: float,
    explicit_fields: set[str] | frozenset[str] = frozenset(),
    trust_remote_code: bool = False,
) -> ModelSetup:
    """`resolve_model_setup` for a config already at hand."""
    family = get_family(config)
    plan = resolve_strategy(tuning, model_args, config, family, learning_rate, explicit_fields)
    strategy_args = copy.copy(model_args)  # not `replace`: TRL's __post_init__ would rewrite lora_target_modules again
    strategy_args.load_in_4bit = plan.strategy.four_bit
    strategy_args.use_peft = plan.strategy.uses_lora
    check_family_settings(strategy_args, family, config)
    return ModelSetup(
        model_args=strategy_args, config=config, family=family, plan=plan, trust_remote_code=trust_remote_code
    )


def check_family_settings(model_args: ModelArguments, family: ModelFamily, config: Any) -> None:
    """What this family (this checkpoint of it: `config`) cannot do with the recipe's model settings, said before any
    weights load."""
    experts = family.uses_fused_experts(config)
    if experts and model_args.use_peft and not model_args.lora_target_modules:
        # peft's LoRA on a parameter (ParamWrapper) cannot factor dropout out of a fused expert matmul
        if model_args.lora_dropout:
            raise RecipeError(
                f"{family.name} is a mixture of experts: LoRA on its fused expert weights (peft target_parameters) "
                f"needs `lora_dropout: 0` (the recipe has {model_args.lora_dropout}). Or set `lora_target_modules` "
                "to adapt the attention projections only."
            )
        if model_args.use_dora:
            raise RecipeError(f"DoRA does not apply to the fused expert weights of {family.name}; drop `use_dora`.")
    if experts and model_args.load_in_4bit:
        logger.warning(
            "4-bit loading quantizes nn.Linear layers only: the fused expert weights of %s (most of its parameters) "
            "stay in %s, so the model needs about the memory of a 16-bit one.",
            family.name,
            model_args.dtype,
        )
