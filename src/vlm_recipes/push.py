"""Push a finished output folder to the Hugging Face Hub, with a model card.

    python -m vlm_recipes.push outputs/qwen2.5-vl-7b-chartqa-qlora --hub_model_id your-name/qwen2.5-vl-chartqa

Pushes the adapter (or model) weights, the processor, the recipe as run, the training log and plot, and the evaluation
results; never checkpoints, optimizer states or pickles (see `vlm_recipes.hub.upload`). The token comes from `--hub_token`,
else HF_TOKEN, else the login cached by `hf auth login`; it is never printed or written anywhere.

    python -m vlm_recipes.push outputs/run --dry_run --dry_run_dir /tmp/upload   # what a push would upload, offline
"""

from vlm_recipes.cli import add_bool_option, command_parser
from vlm_recipes.console import setup_console
from vlm_recipes.errors import exit_on_recipe_error
from vlm_recipes.hub.card import card_repo_id
from vlm_recipes.hub.push import push_output_dir
from vlm_recipes.hub.token import hub_target
from vlm_recipes.run_folder import read_saved_recipe


def build_parser():
    parser = command_parser("vlm-recipes push", __doc__.splitlines()[0])
    parser.add_argument("output_dir", help="The output folder of a finished training run.")
    parser.add_argument("--hub_model_id", default=None, help="owner/name of the repository (default: the recipe's).")
    add_bool_option(
        parser,
        "--hub_private_repo",
        "Create the repository private (true) or public (false). Default: the recipe's, else the Hub's default. "
        "An existing repository keeps its visibility.",
        default=None,
    )
    parser.add_argument("--hub_token", default=None, help="A write token (default: HF_TOKEN or the cached login).")
    parser.add_argument("--commit_message", default=None, help='Default: "Upload <folder name> (vlm-recipes)".')
    add_bool_option(
        parser,
        "--dry_run",
        "Do everything but upload, offline and without a token: write the card, list the files a push would "
        "upload (local paths scrubbed) and what stays local.",
    )
    parser.add_argument(
        "--dry_run_dir",
        default=None,
        help="With --dry_run: write the exact files a push would upload into this folder.",
    )
    return parser


@exit_on_recipe_error
def main(argv: list[str] | None = None) -> str:
    setup_console()
    args = build_parser().parse_args(argv)
    saved = read_saved_recipe(args.output_dir)
    private = args.hub_private_repo if args.hub_private_repo is not None else saved.get("hub_private_repo")
    repo_id = args.hub_model_id or saved.get("hub_model_id")
    if args.dry_run:
        target = hub_target(card_repo_id(args.output_dir, repo_id), private, args.hub_token, needs_token=False)
        return push_output_dir(args.output_dir, target, dry=True, preview_dir=args.dry_run_dir)
    target = hub_target(repo_id, private, args.hub_token)
    return push_output_dir(args.output_dir, target, args.commit_message)


if __name__ == "__main__":
    main()
