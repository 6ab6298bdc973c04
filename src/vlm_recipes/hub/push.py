"""One push of a finished output folder: the model card written, then the repository created (if needed) and the
allow-listed files uploaded in one commit."""

from pathlib import Path

from vlm_recipes.console import print_main
from vlm_recipes.errors import RecipeError
from vlm_recipes.hub.card import model_card, write_model_card
from vlm_recipes.hub.license import base_model_license
from vlm_recipes.hub.token import HubTarget
from vlm_recipes.hub.upload import files_to_push
from vlm_recipes.run_folder import CARD_FILE, SavedRun


NETWORK_ERROR_MODULES = ("httpx2", "httpx", "requests", "urllib3")


def _is_network_error(error: Exception) -> bool:
    # huggingface_hub's HTTP client (httpx2 in 2.x, httpx or requests before) raises its own connection errors.
    return isinstance(error, OSError) or type(error).__module__.split(".")[0] in NETWORK_ERROR_MODULES


def push_output_dir(output_dir: str | Path, target: HubTarget, commit_message: str | None = None) -> str:
    """Write the model card, then create the repository (if needed) and upload the allow-listed files in one commit.
    Returns the repository URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise RecipeError(f"{output_dir} is not a folder: pass the `output_dir` of a finished training run.")
    run = SavedRun.read(output_dir)
    if not any(output_dir.glob("*.safetensors")):
        raise RecipeError(f"{output_dir} holds no weights (*.safetensors): is it the output folder of a finished run?")
    card = model_card(run, target.repo_id, base_model_license(run.base_model, target.token))
    if not write_model_card(output_dir, card):
        print_main(f"{output_dir / CARD_FILE} was written by hand: it is pushed as the model card, unchanged.")
    pushed, left_out = files_to_push(output_dir)

    api = HfApi(token=target.token)
    try:
        repo = api.create_repo(target.repo_id, private=target.private, exist_ok=True, repo_type="model")
        api.create_commit(
            repo_id=repo.repo_id,
            repo_type="model",
            operations=[
                CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(output_dir / name)) for name in pushed
            ],
            commit_message=commit_message or f"Upload {output_dir.name} (vlm-recipes)",
        )
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        hint = " The token was refused or lacks write access to that namespace." if status in (401, 403) else ""
        raise RecipeError(
            f"Pushing {output_dir} to {target.repo_id} failed: {str(error).splitlines()[0]}.{hint} The outputs are "
            f"safe in {output_dir}; push them again with `python -m vlm_recipes.push {output_dir} --hub_model_id "
            f"{target.repo_id}`."
        ) from None
    except Exception as error:
        if not _is_network_error(error):
            raise
        raise RecipeError(
            f"Could not reach the Hub to push {output_dir} to {target.repo_id} ({type(error).__name__}). The outputs "
            f"are safe in {output_dir}; push them later with `python -m vlm_recipes.push {output_dir} --hub_model_id "
            f"{target.repo_id}`."
        ) from None
    url = f"https://huggingface.co/{repo.repo_id}"
    print_main(f"Pushed {len(pushed)} files to {url}: {', '.join(pushed)}")
    if left_out:
        print_main(f"Kept local (not pushed): {', '.join(left_out)}")
    return url
