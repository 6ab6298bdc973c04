"""Special tokens written inside a row's text: found, or escaped so that they tokenize as plain text.

A tokenizer reads its special tokens anywhere in the text it is given, also inside an answer: an answer that holds
`<|im_end|>\n<|im_start|>user` is tokenized as the real turn markers, and with assistant-only loss the model is trained
to emit them. The data checks (`data.checks`) reject such a row, naming the token, or, with
`special_tokens_in_text: escape`, put a zero-width space (U+200B) after the token's first character: the text still
reads the same, and no tokenizer matches the token any more, so it is learned as the characters it is made of.

Which tokens: every special token of the tokenizer (turn markers, BOS/EOS, padding, image/video placeholders and pads,
...), every other token the tokenizer adds as one piece that the chat template itself writes (Qwen's `<tool_call>`,
`<think>`), and the processor's image and video tokens.
"""

import re
from typing import Any


ESCAPE = "\u200b"  # zero-width space: invisible, and never part of a special token


def special_token_texts(processor: Any, *chat_templates: str | None) -> tuple[str, ...]:
    """The texts of the processor's special tokens (see the module docstring), longest first (so that a token that
    contains another is found whole)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    templates = "".join(template for template in chat_templates if isinstance(template, str))
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        content = getattr(token, "content", str(token))
        if getattr(token, "special", False) or (content.strip() and content in templates):
            found.add(content)
    for name in ("image_token", "video_token", "boi_token", "eoi_token", "audio_token"):
        value = getattr(processor, name, None) or getattr(tokenizer, name, None)
        if isinstance(value, str):
            found.add(value)
    # A one-character token cannot be broken by an inserted character (nor is it markup a row would hold by mistake).
    return tuple(sorted((text for text in found if len(text.strip()) > 1), key=lambda text: (-len(text), text)))


def find_special_token(text: str, tokens: tuple[str, ...]) -> str | None:
    """The token of `tokens` that comes first in `text` (the longest, where several start there), or None."""
    found = [(text.find(token), -len(token), token) for token in tokens if token in text]
    return min(found)[2] if found else None


def escape_special_tokens(text: str, tokens: tuple[str, ...]) -> tuple[str, list[str]]:
    """(`text` with every occurrence of `tokens` broken by a zero-width space after its first character, the tokens
    that were escaped, in order of first appearance). At each position the longest token matches, and the text is
    scanned again until it holds none (a token inside another one's tail is escaped too)."""
    tokens = tuple(token for token in tokens if len(token) > 1)  # see special_token_texts
    if not tokens:
        return text, []
    pattern = re.compile("|".join(re.escape(token) for token in sorted(tokens, key=len, reverse=True)))
    escaped: list[str] = []

    def escape(match: re.Match) -> str:
        if match[0] not in escaped:
            escaped.append(match[0])
        return match[0][0] + ESCAPE + match[0][1:]

    while pattern.search(text):
        text = pattern.sub(escape, text)
    return text, escaped
