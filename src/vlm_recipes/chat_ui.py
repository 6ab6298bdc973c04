"""`vlm-recipes chat --ui`: the chat in a web page on this machine (Gradio, the optional `ui` extra).

The page drives the same `chat.ChatSession` as the terminal loop: an uploaded image goes with the next message, each
side of the session (the model; or the base and the adapter with `--compare`) shows its conversation in its own
column, and "New conversation" starts over. The session is one per server: the page is a local tool for one user.
"""

from typing import Any

from vlm_recipes.errors import RecipeError


def require_gradio() -> None:
    """A clear error, before any model loads, where the extra is not installed."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise RecipeError("The web chat needs Gradio: pip install 'vlm-recipes[ui]'.") from None


def shown_history(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """A side's conversation as Gradio's Chatbot shows it (role and text; an image turn says it had one)."""
    shown = []
    for message in messages:
        if message["role"] == "system":
            continue
        blocks = message["content"]
        text = " ".join(block["text"] for block in blocks if block["type"] == "text")
        images = sum(block["type"] == "image" for block in blocks)
        prefix = f"[{images} image{'s' if images > 1 else ''}] " if images else ""
        shown.append({"role": message["role"], "content": prefix + text})
    return shown


def build_app(session: Any) -> Any:
    """The page for `session` (a `chat.ChatSession`; not imported here: `chat` imports this module for `--ui`): a
    column per side, an image upload and a message box; `ask` and `reset` are also the app's API (what
    `gradio_client` calls)."""
    import gradio as gr

    def histories() -> list[list[dict[str, str]]]:
        return [shown_history(session.messages[side]) for side in session.sides]

    def ask(message: str, image: Any):
        if image is not None:
            session.add_image(image)
        if message.strip():
            session.ask(message.strip())
        return [*histories(), None, ""]

    def reset():
        session.reset()
        return [*histories(), None, ""]

    with gr.Blocks(title="vlm-recipes chat") as app:
        gr.Markdown("Upload an image for your next message; " + " and ".join(session.sides) + " answer each turn.")
        with gr.Row():
            columns = [gr.Chatbot(label=side, height=420) for side in session.sides]
        with gr.Row():
            image = gr.Image(type="pil", label="Image for your next message", height=200)
            message = gr.Textbox(label="Message", lines=3)
        with gr.Row():
            send = gr.Button("Send", variant="primary")
            new = gr.Button("New conversation")
        outputs = [*columns, image, message]
        send.click(ask, [message, image], outputs, api_name="ask")
        message.submit(ask, [message, image], outputs, api_name=False)
        new.click(reset, [], outputs, api_name="reset")
        app.load(histories, [], columns, api_name=False)  # a reloaded page shows the conversation so far
    return app


def launch(session: Any, port: int = 7860, block: bool = True) -> Any:
    """Serve the page on this machine only (127.0.0.1); `block=False` returns the running app (tests)."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline machines: no usage report
    app = build_app(session)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=not block, quiet=not block)
    return app
