"""One push of a finished output folder: the model card written, then the repository created (if needed) and the
allow-listed files uploaded in one commit (`hub.upload.upload_contents`: local paths scrubbed). A dry run stops before
the Hub: it prints what would be uploaded and can write those exact bytes into a folder to read."""

from pathlib import Path

from vlm_recipes.console import print_main
from vlm_recipes.errors import RecipeError
from vlm_recipes.hub.card import model_card, write_model_card
from vlm_recipes.hub.license import base_model_license
from vlm_recipes.hub.token import HubTarget
from vlm_recipes.hub.upload import upload_contents
from vlm_recipes.run_folder import CARD_FILE, SavedRun


NETWORK_ERROR_MODULES = ("httpx2", "httpx", "requests", "urllib3")


def _is_network_error(error: Exception) -> bool:
    # huggingface_hub's HTTP client (httpx2 in 2.x, httpx or requests before) raises its own connection errors.
    return isinstance(error, OSError) or type(error).__module__.split(".")[0] in NETWORK_ERROR_MODULES


def _size(content: bytes | Path) -> str:
    size = len(content) if isinstance(content, bytes) else content.stat().st_size
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"


def dry_run(output_dir: Path, repo_id: str, contents: dict[str, bytes | Path], preview_dir: str | Path | None) -> None:
    """Print what a push would upload (and write those bytes under `preview_dir`); nothing reaches the Hub."""
    print_main(f"Dry run: a push to {repo_id} would upload {len(contents)} files:")
    print_main(*(f"  {name} ({_size(content)})" for name, content in contents.items()))
    if preview_dir is None:
        print_main(f"The model card is {output_dir / CARD_FILE}; `--dry_run_dir DIR` also writes the upload into DIR.")
        return
    preview = Path(preview_dir)
    if preview.exists() and any(preview.iterdir()):
        raise RecipeError(f"--dry_run_dir {preview} is not empty: name a new or empty folder.")
    for name, content in contents.items():
        (preview / name).parent.mkdir(parents=True, exist_ok=True)
        (preview / name).write_bytes(content if isinstance(content, bytes) else content.read_bytes())
    print_main(f"Wrote the files a push would upload to {preview}.")


def push_output_dir(
    output_dir: str | Path,
    target: HubTarget,
    commit_message: str | None = None,
    *,
    dry: bool = False,
    preview_dir: str | Path | None = None,
) -> str:
    """Write the model card, then create the repository (if needed) and upload the allow-listed files in one commit.
    Returns the repository URL. `dry`: everything up to the upload, offline; `target` then needs no token."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise RecipeError(f"{output_dir} is not a folder: pass the `output_dir` of a finished training run.")
    run = SavedRun.read(output_dir)
    if not any(output_dir.glob("*.safetensors")):
        raise RecipeError(f"{output_dir} holds no weights (*.safetensors): is it the output folder of a finished run?")
    card = model_card(run, target.repo_id, base_model_license(run.base_model, target.token or None))
    if not write_model_card(output_dir, card):
        print_main(f"{output_dir / CARD_FILE} was written by hand: it is pushed as the model card, unchanged.")
    contents, left_out, scrubbed = upload_contents(output_dir)
    pushed = list(contents)
    if scrubbed:
        print_main(
            "Local paths replaced by their last part in the upload: "
            + ", ".join(f"{name} ({count})" for name, count in scrubbed.items())
        )
    if dry:
        dry_run(output_dir, target.repo_id, contents, preview_dir)
        if left_out:
            print_main(f"Kept local (not pushed): {', '.join(left_out)}")
        return f"https://huggingface.co/{target.repo_id}"

    api = HfApi(token=target.token)
    try:
        repo = api.create_repo(target.repo_id, private=target.private, exist_ok=True, repo_type="model")
        api.create_commit(
            repo_id=repo.repo_id,
            repo_type="model",
            operations=[
                CommitOperationAdd(
                    path_in_repo=name, path_or_fileobj=content if isinstance(content, bytes) else str(content)
                )
                for name, content in contents.items()
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
