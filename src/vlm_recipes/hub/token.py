"""The Hub token and the checked target of a push, found before any work so that a push never fails at the end.

The token comes from `hub_token`, else from huggingface_hub (`HF_TOKEN`, then the login cached by `hf auth login`). It is
kept out of every repr, log and file.
"""

from dataclasses import dataclass, field
from typing import Any

from vlm_recipes.errors import RecipeError


NO_TOKEN_MESSAGE = (
    "Pushing to the Hub needs a Hugging Face token with write access, and none was found. Log in once with "
    "`hf auth login`, or set the HF_TOKEN environment variable, or pass `--hub_token`. Nothing was pushed."
)


@dataclass
class HubTarget:
    """Where a push goes. The token is kept out of the repr so that it never lands in a log."""

    repo_id: str
    private: bool | None = None
    token: str = field(default="", repr=False)


def find_token(explicit: str | None = None) -> str:
    """`explicit`, else huggingface_hub's token (HF_TOKEN, then the cached login); a clear error when there is none."""
    from huggingface_hub import get_token

    token = explicit or get_token()
    if not token:
        raise RecipeError(NO_TOKEN_MESSAGE)
    return token


def hub_target(
    repo_id: str | None, private: bool | None = None, token: str | None = None, *, needs_token: bool = True
) -> HubTarget:
    """A checked target: a valid repo id and a token. Called before any work, so a push never fails at the end."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not repo_id:
        raise RecipeError(
            "Pushing to the Hub needs `hub_model_id`, the repository to push to (e.g. your-name/my-vlm)."
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise RecipeError(f"`hub_model_id` '{repo_id}' is not a valid repository id: {error}") from None
    return HubTarget(repo_id=repo_id, private=private, token=find_token(token) if needs_token else (token or ""))


def prepare_training_push(training_args: Any) -> HubTarget | None:
    """With `push_to_hub`, check the target and the token before training, and push once at the end ourselves:
    the Trainer's own push would upload at every save, checkpoints and all.

    `hub_token` is cleared from the training arguments in every case (pushing or not): the Trainer pickles them into
    each checkpoint's `training_args.bin`, so the token would be written to disk. It lives on in the target only."""
    token, training_args.hub_token = training_args.hub_token, None
    if not training_args.push_to_hub:
        return None
    target = hub_target(training_args.hub_model_id, training_args.hub_private_repo, token)
    training_args.push_to_hub = False
    return target
