"""The base model's license, for the model card: from its local card, or its card data on the Hub."""

from pathlib import Path
from typing import Any

import yaml

from vlm_recipes.evaluation.card import is_local_path
from vlm_recipes.run_folder import CARD_FILE


def _front_matter(text: str) -> dict[str, Any]:
    if not text.startswith("---"):
        return {}
    try:
        data = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return {}
    return data if isinstance(data, dict) else {}


def base_model_license(base_model: str | None, token: str | None = None) -> str | None:
    """The base model's license, from its local card or its Hub card data; None when it cannot be found."""
    if not base_model:
        return None
    local = Path(str(base_model)).expanduser()
    if local.is_dir():
        card = local / CARD_FILE
        return _front_matter(card.read_text(encoding="utf-8")).get("license") if card.is_file() else None
    if is_local_path(base_model):
        return None
    try:
        from huggingface_hub import HfApi

        card_data = HfApi(token=token).model_info(base_model).card_data
    except Exception:  # offline, gated or private: the card says the license is unknown
        return None
    if card_data is None:
        return None
    license_name = card_data.get("license")
    if license_name == "other":  # a custom license: its name is in `license_name`
        return card_data.get("license_name") or license_name
    return license_name
