"""vlm-recipes: fine-tune vision-language models with TRL, from a YAML recipe."""

from vlm_recipes.console import quiet_known_noise


__version__ = "0.1.0"

quiet_known_noise()
