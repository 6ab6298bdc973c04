"""Chat with a model about images: a quick look at a fine-tune, in the terminal or in the browser.

    vlm-recipes chat --adapter outputs/run                          # a conversation; `/image chart.png` adds an image
    vlm-recipes chat --adapter outputs/run --compare                # the base and the adapter answer every turn
    vlm-recipes chat --adapter outputs/run --ui                     # the same in a web page (the `ui` extra)
    vlm-recipes chat --model outputs/merged --image chart.png --question "Which year is highest?"   # one answer

`--model` is a base or merged model (a Hub id or a folder); `--adapter` adds a trained adapter, and alone loads the
base it names (an adapter folder with `sft_adapter/`, from DPO with `reference: sft_merged`, loads on base + that
SFT adapter merged in). The system prompt defaults to the one the model was trained with (the `recipe.yaml` saved
with it). The model loads once; the conversation's turns go through its chat template, images where they were added.
Temperature 0 (the default) is greedy decoding, the same as evaluation's.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from vlm_recipes.cli import add_bool_option, command_parser
from vlm_recipes.configs import ModelArguments
from vlm_recipes.console import setup_console
from vlm_recipes.data.images import ImageProblem, decode_image, to_rgb
from vlm_recipes.errors import RecipeError, exit_on_recipe_error
from vlm_recipes.run_folder import read_saved_recipe


def load_image(path: str) -> Any:
    """The image as training saw its images: decoded in full (within PIL's decompression limit) and made RGB the way
    the data checks do (`data.images`); a file that cannot be used is one error naming it."""
    try:
        return to_rgb(decode_image(path))
    except ImageProblem as problem:
        raise RecipeError(f"--image {path}: the image {str(problem).rstrip('.')}.") from None


def chat_row(images: list[Any], question: str, system_prompt: str | None) -> dict[str, Any]:
    """A row in the formatters' shape: images first, then the question."""
    system = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] if system_prompt else []
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    return {"images": images, "messages": [*system, {"role": "user", "content": content}]}


@dataclass
class Sampling:
    max_new_tokens: int = field(default=128, metadata={"help": "Longest answer, in tokens."})
    temperature: float = field(default=0.0, metadata={"help": "0 is greedy decoding (evaluation's); above, sampling."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling: the smallest set of tokens this likely."})
    seed: int | None = field(default=None, metadata={"help": "Seed for sampling, set once when the model loads."})

    def generation_config(self, model: Any, processor: Any) -> Any:
        from vlm_recipes.evaluation.generate import greedy_generation_config

        config = greedy_generation_config(model, processor, self.max_new_tokens)
        if self.temperature > 0:
            config.do_sample, config.temperature, config.top_p = True, self.temperature, self.top_p
        return config


class ChatSession:
    """A conversation with a loaded model, kept as the chat template's message list; the terminal loop and the web UI
    (`chat_ui`) both drive it. With `compare`, the base (adapter switched off) and the adapter each hold their own
    side of the conversation and answer every turn."""

    def __init__(self, model: Any, processor: Any, system_prompt: str | None, sampling: Sampling, compare: bool):
        if compare and not hasattr(model, "disable_adapter"):
            raise RecipeError("--compare needs an adapter to switch off and on: pass --adapter.")
        self.model, self.processor, self.system_prompt, self.sampling = model, processor, system_prompt, sampling
        self.sides = ("base", "adapter") if compare else ("model",)
        if sampling.seed is not None:
            from transformers import set_seed

            set_seed(sampling.seed)
        self.reset()

    def reset(self) -> None:
        """A new conversation: no turns, no images."""
        system = [{"role": "system", "content": [{"type": "text", "text": self.system_prompt}]}]
        self.messages = {side: list(system) if self.system_prompt else [] for side in self.sides}
        self.images: list[Any] = []  # every image of the conversation, in the order its turns show them
        self.pending: list[Any] = []  # images for the next user turn

    def add_image(self, image: Any) -> None:
        """An image (a path, or a PIL image from the web UI) for the next turn; a bad file raises RecipeError."""
        self.pending.append(load_image(image) if isinstance(image, str | Path) else to_rgb(image))

    def ask(self, question: str, on_text: Any = None) -> dict[str, str]:
        """Each side's answer to `question` (with the pending images); `on_text(side, text)` receives the text as it
        is generated."""
        content = [{"type": "image"} for _ in self.pending] + [{"type": "text", "text": question}]
        self.images += self.pending
        self.pending = []
        replies = {}
        for side in self.sides:
            self.messages[side].append({"role": "user", "content": content})
            replies[side] = self._generate(self.messages[side], side, on_text)
            self.messages[side].append({"role": "assistant", "content": [{"type": "text", "text": replies[side]}]})
        return replies

    def _generate(self, messages: list[dict[str, Any]], side: str, on_text: Any) -> str:
        import contextlib

        import torch

        from vlm_recipes.evaluation.generate import encode_prompts, model_device

        row = {"images": self.images, "messages": messages}
        inputs = encode_prompts(self.processor, [row], prompt=lambda row: row["messages"]).to(model_device(self.model))
        streamer = None
        if on_text:
            on_text(side, "")  # the side's name shows even before (or without) any text
            streamer = _Streamer(self.processor, lambda text: on_text(side, text))
        base_only = self.model.disable_adapter() if side == "base" else contextlib.nullcontext()
        with torch.no_grad(), base_only:
            output = self.model.generate(
                **inputs,
                generation_config=self.sampling.generation_config(self.model, self.processor),
                streamer=streamer,
            )
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        return self.processor.decode(new_tokens, skip_special_tokens=True).strip()


def _Streamer(processor: Any, write: Any) -> Any:
    """transformers' TextStreamer, its finished text passed to `write` rather than printed."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            write(text)

    return Streamer(getattr(processor, "tokenizer", processor), skip_prompt=True, skip_special_tokens=True)


def load_session(
    *,
    model: str | None = None,
    adapter: str | None = None,
    system_prompt: str | None = None,
    sampling: Sampling | None = None,
    compare: bool = False,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> ChatSession:
    """The model (and adapter) loaded once, in a new conversation."""
    from vlm_recipes.modeling.adapters import adapter_model_arguments
    from vlm_recipes.modeling.loading import load_for_inference

    if not model and not adapter:
        raise RecipeError("Pass --model (a base or merged model) or --adapter (a trained adapter folder), or both.")
    if compare and not adapter:
        raise RecipeError("--compare answers with the base and with the adapter: pass --adapter.")
    overrides = {"dtype": dtype} if dtype else {}
    if adapter:
        model_args = adapter_model_arguments(adapter, model, **overrides)
    else:
        model_args = ModelArguments(model_name_or_path=model, **overrides)
    saved = read_saved_recipe(adapter or model) if Path(adapter or model).is_dir() else {}
    if system_prompt is None:
        system_prompt = saved.get("system_prompt")
    loaded, processor, _ = load_for_inference(model_args, adapter, trust_remote_code)
    return ChatSession(loaded, processor, system_prompt, sampling or Sampling(), compare)


def answer(question: str, images: list[str], **options: Any) -> dict[str, str]:
    """Each side's answer to one question (`--question`): at temperature 0, the same generation as evaluation's."""
    pictures = [load_image(path) for path in images]  # a bad image fails before the model loads
    session = load_session(**options)
    session.pending = pictures
    return session.ask(question)


class SidePrinter:
    """Streamed text, each side's answer under its name (`base> ...`), the next side's on a new line."""

    def __init__(self, write: Any):
        self.write, self.side = write, None

    def __call__(self, side: str, text: str) -> None:
        if side != self.side:
            self.write(("" if self.side is None else "\n") + f"{side}> ")
            self.side = side
        self.write(text)


COMMANDS_HELP = "/image PATH adds an image to your next message, /reset starts over, /quit ends (or Ctrl-D)."


def chat_loop(session: ChatSession, lines: TextIO | None = None, out: TextIO | None = None) -> None:
    """The terminal conversation (`lines`: stdin, `out`: stdout by default): a line is a message, or a command
    (`/image PATH`, `/reset`, `/quit`); answers are printed as they are generated, each side's under its name."""
    lines, out = lines or sys.stdin, out or sys.stdout

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    write(f"{COMMANDS_HELP}\n")
    while True:
        write("you> ")
        line = lines.readline()
        if not line:  # end of input
            write("\n")
            return
        text = line.strip()
        if not text:
            continue
        command, _, argument = text.partition(" ")
        if command == "/quit":
            return
        if command == "/reset":
            session.reset()
            write("(a new conversation)\n")
        elif command == "/image":
            try:
                session.add_image(argument.strip())
                write(f"(image {argument.strip()} goes with your next message)\n")
            except RecipeError as error:
                write(f"error: {error}\n")
        elif command.startswith("/"):
            write(f"error: unknown command {command}. {COMMANDS_HELP}\n")
        else:
            session.ask(text, SidePrinter(write))
            write("\n")


def build_parser():
    parser = command_parser("vlm-recipes chat", __doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Base or merged model: a Hub id or a folder.")
    parser.add_argument("--adapter", default=None, help="A trained adapter folder; alone, it loads the base it names.")
    parser.add_argument("--image", action="append", default=None, help="An image file for the first message (repeat).")
    parser.add_argument("--question", default=None, help="Answer this one question (with --image) and exit.")
    parser.add_argument("--system_prompt", default=None, help="Default: the trained model's, from its recipe.yaml.")
    for name, option in Sampling.__dataclass_fields__.items():
        kind = int if name in {"max_new_tokens", "seed"} else float
        parser.add_argument(f"--{name}", type=kind, default=option.default, help=option.metadata["help"])
    add_bool_option(parser, "--compare", "Answer every turn with the base (adapter off) and the adapter.")
    add_bool_option(parser, "--ui", "Open the chat in a web page (Gradio: pip install 'vlm-recipes[ui]').")
    parser.add_argument("--port", type=int, default=7860, help="The web page's port on this machine (--ui).")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default=None,
        help="Weights' dtype (default: the trained recipe's, else the model's).",
    )
    add_bool_option(parser, "--trust_remote_code", "Allow the model's own code from its repository.")
    return parser


@exit_on_recipe_error
def main(argv: list[str] | None = None) -> str | None:
    setup_console()
    args = build_parser().parse_args(argv)
    if args.ui:
        from vlm_recipes.chat_ui import require_gradio

        require_gradio()  # before the model loads
    options = dict(
        model=args.model,
        adapter=args.adapter,
        system_prompt=args.system_prompt,
        sampling=Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed),
        compare=args.compare,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
    if args.question is not None:
        replies = answer(args.question, args.image or [], **options)
        for side, reply in replies.items():
            print(f"{side}> {reply}" if args.compare else reply, flush=True)
            if not reply:
                print(f"({side}: the model ended its answer at once, an empty reply)", file=sys.stderr, flush=True)
        return replies if args.compare else replies["model"]
    pictures = [load_image(path) for path in args.image or []]
    session = load_session(**options)
    session.pending = pictures
    if args.ui:
        from vlm_recipes.chat_ui import launch

        launch(session, port=args.port)
    else:
        chat_loop(session)
    return None


if __name__ == "__main__":
    main()
