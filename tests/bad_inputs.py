"""A battery of bad inputs beside valid rows, as a conversations JSONL with image files (shared by the tests)."""

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


# line in the JSONL -> the reason the data report counts it under
REJECTED = {
    7: "corrupt or truncated image",  # corrupt bytes
    8: "corrupt or truncated image",  # truncated file
    9: "image file not found",
    13: "image too small",  # 1x1
    15: "empty assistant turn",
    16: "turn is not text",  # a number where the answer text belongs
    17: "malformed turn",  # a user turn without its question
    18: "no 'messages' or 'conversations' in the row",  # wrong column names
    19: "<image> placeholders do not match the images",
    20: "longer than max_length",  # text far longer than max_length
    21: "image is not a path or an image",  # a number
    22: "image is not a path or an image",  # a dict that is not an encoded image
    23: "image is not a path or an image",  # a list of numbers
    24: "special token <|im_end|> in the text",  # an answer that would teach the model to end its turn and go on
    25: "image in an assistant turn",  # an <image> placeholder inside the answer
}
# line -> the fix the row is kept with
FIXED = {
    10: "CMYK -> RGB",
    11: "P with transparency -> RGB over white",
    12: "I;16 (wide) grayscale -> RGB, scaled to 8 bits",
    14: "aspect ratio over 200:1 -> squashed to 200:1",
}
VALID_LINES = range(1, 7)
OUTSIDE_LINES = [26]  # a valid row whose image lies outside the data folder (`../`): kept, and counted
ROWS = 26
MAX_LENGTH = 512  # the long-text row is ~3,000 tokens; every other row is under 300


def _save(folder: Path, name: str, image: Image.Image, **options) -> str:
    image.save(folder / name, **options)
    return name


def row(image: str | None, question="<image>What is the value of Corn?", answer="42"):
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        "images": [image] if image else [],
    }


def write_bad_input_dataset(folder: Path) -> Path:
    """Six valid rows (lines 1-6), then one row per bad input (see REJECTED and FIXED). Returns the JSONL path."""
    folder.mkdir(parents=True, exist_ok=True)
    valid = [_save(folder, f"valid{i}.png", Image.new("RGB", (64 + 8 * i, 48), color)) for i, color in
             enumerate(["red", "blue", "green", "orange", "purple", "gray"])]  # fmt: skip
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 40)
    noisy = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (120, 160, 3), dtype=np.uint8)).save(noisy, "PNG")
    (folder / "truncated.png").write_bytes(noisy.getvalue()[: len(noisy.getvalue()) // 2])
    palette = Image.new("P", (64, 48), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.putpixel((0, 0), 1)
    rows = [
        *(row(name) for name in valid),
        row("corrupt.png"),
        row("truncated.png"),
        row("missing.png"),
        row(_save(folder, "cmyk.jpg", Image.new("CMYK", (64, 48), (0, 255, 255, 0)))),
        row(_save(folder, "palette.png", palette, transparency=0)),
        row(_save(folder, "gray16.png", Image.fromarray(np.full((48, 64), 257 * 156, dtype=np.uint16)))),
        row(_save(folder, "one_pixel.png", Image.new("RGB", (1, 1), "blue"))),
        row(_save(folder, "wide.png", Image.new("RGB", (10000, 40), "green"))),
        row(valid[0], answer=""),
        row(valid[0], answer=42),
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "42"}], "images": [valid[0]]},
        {"question": "What is the value of Corn?", "answer": "42", "image": valid[0]},
        row(valid[0], question="<image><image>Which is higher?"),
        row(valid[0], question="<image>" + "Describe every bar of the chart in detail. " * 300),
        {**row(None), "images": [7]},
        {**row(None), "images": [{"width": 64, "height": 48}]},
        {**row(None, question="<image><image>Compare them."), "images": [[0, 255, 0], [255, 0, 0]]},
        row(valid[0], answer="42<|im_end|>\n<|im_start|>user\nAnd Wheat?<|im_end|>\n<|im_start|>assistant\n7"),
        {**row(valid[0], answer="Here it is: <image>"), "images": [valid[0], valid[1]]},
        row(f"../{_save(folder.parent, 'outside.png', Image.new('RGB', (64, 48), 'teal'))}"),
    ]
    path = folder / "bad_inputs.jsonl"
    path.write_text("\n".join(json.dumps(item) for item in rows) + "\n", encoding="utf-8")
    return path
