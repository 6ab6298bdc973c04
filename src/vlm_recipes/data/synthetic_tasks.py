"""Generated rows in the Hub schemas of the evaluation tasks beyond ChartQA, with images drawn by PIL and known answers.

- `make_docvqa_rows`: lmms-lab/DocVQA (config DocVQA): a drawn invoice, memo or receipt page; `answers` lists the
  accepted ways to write the answer (`$1,284.50`, `1,284.50`), as the real data does.
- `make_textvqa_rows`: lmms-lab/textvqa: a sign on a coloured scene; `answers` holds ten human answers that mostly agree
  and sometimes differ (case, an added word, "unanswerable"), as the real annotations do.
- `make_scienceqa_rows`: lmms-lab/ScienceQA (ScienceQA-IMG): coloured shapes, a question with two to four `choices`, the
  `answer` as an index, and sometimes a `hint`.

`vlm_recipes.data.synthetic` writes them as dataset folders (`--schema docvqa|textvqa|scienceqa`).
"""

import random
from typing import Any

from PIL import Image, ImageDraw


COLORS = {
    "red": (214, 39, 40), "blue": (31, 119, 180), "green": (44, 160, 44), "orange": (255, 127, 14),
    "purple": (148, 103, 189), "brown": (140, 86, 75), "gray": (127, 127, 127), "yellow": (230, 200, 30),
}  # fmt: skip
COMPANIES = ["Kenya Trading Co.", "Norway Fisheries", "Chile Copper Ltd.", "Fiji Sugar Corp.", "Peru Textiles"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October"]
SIGN_WORDS = ["stop", "exit", "open", "sale", "hotel", "pizza", "taxi", "bakery", "pharmacy", "coffee"]


def _document(rng: random.Random) -> tuple[Image.Image, list[tuple[str, list[str], str]]]:
    """A page with a title and four fields; the questions it answers as (question, answers, question type)."""
    kind = rng.choice(["INVOICE", "MEMO", "RECEIPT"])
    number = str(rng.randint(10000, 99999))
    day, month, year = rng.randint(1, 28), rng.randrange(len(MONTHS)), rng.randint(1985, 2005)
    company = rng.choice(COMPANIES)
    total = rng.randint(100, 99999) + rng.choice([0, 0.25, 0.5, 0.75])
    lines = [
        kind,
        f"No: {number}",
        f"Date: {month + 1:02d}/{day:02d}/{year}",
        f"To: {company}",
        f"Total: ${total:,.2f}",
    ]
    width, height = rng.randint(240, 420), rng.randint(300, 520)
    page = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)
    for index, line in enumerate(lines):
        draw.text((16, 16 + index * 28 + (8 if index else 0)), line, fill="black")
    draw.rectangle([8, 8, width - 8, height - 8], outline=(90, 90, 90))
    questions = [
        (f"What is the {kind.lower()} number?", [number], "handwritten" if rng.random() < 0.2 else "form"),
        (
            "What is the date mentioned in the document?",
            [f"{month + 1:02d}/{day:02d}/{year}", f"{MONTHS[month]} {day}, {year}"],
            "layout",
        ),
        (f"To whom is the {kind.lower()} addressed?", [company], "form"),
        ("What is the total amount?", [f"${total:,.2f}", f"{total:,.2f}"], "table/list"),
    ]
    return page, questions


def make_docvqa_rows(num_rows: int, seed: int = 0, **_: Any) -> list[dict[str, Any]]:
    """`num_rows` rows in lmms-lab/DocVQA's schema (two questions per page)."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    while len(rows) < num_rows:
        page, questions = _document(rng)
        doc_id = 1000 + len(rows)
        for question, answers, question_type in rng.sample(questions, 2):
            rows.append(
                {
                    "questionId": str(50000 + len(rows)),
                    "question": question,
                    "question_types": [question_type],
                    "image": page,
                    "docId": doc_id,
                    "ucsf_document_id": f"synthetic{doc_id}",
                    "ucsf_document_page_no": "1",
                    "answers": answers,
                    "data_split": "generated",
                }
            )
    return rows[:num_rows]


def docvqa_features():
    from datasets import Features, Image, List, Value

    text = Value("string")
    return Features(
        {
            "questionId": text, "question": text, "question_types": List(text), "image": Image(),
            "docId": Value("int64"), "ucsf_document_id": text, "ucsf_document_page_no": text, "answers": List(text),
            "data_split": text,
        }
    )  # fmt: skip


def _sign(rng: random.Random) -> tuple[Image.Image, str, str]:
    word, color = rng.choice(SIGN_WORDS), rng.choice(list(COLORS))
    width, height = rng.randint(200, 400), rng.randint(160, 320)
    scene = Image.new("RGB", (width, height), (rng.randint(150, 230), rng.randint(170, 230), rng.randint(180, 250)))
    draw = ImageDraw.Draw(scene)
    left, top = rng.randint(10, width // 3), rng.randint(10, height // 3)
    draw.rectangle([left, top, left + 110, top + 44], fill=COLORS[color], outline="black")
    draw.text((left + 12, top + 16), word.upper(), fill="white")
    return scene, word, color


def _human_answers(answer: str, variants: list[str], rng: random.Random) -> list[str]:
    """Ten answers: mostly `answer`, a few variants, as annotators write them."""
    disagreeing = rng.randint(0, 4)
    return [answer] * (10 - disagreeing) + [rng.choice(variants) for _ in range(disagreeing)]


def make_textvqa_rows(num_rows: int, seed: int = 0, **_: Any) -> list[dict[str, Any]]:
    """`num_rows` rows in lmms-lab/textvqa's schema, each with ten human answers."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    while len(rows) < num_rows:
        scene, word, color = _sign(rng)
        image_id = f"{rng.getrandbits(64):016x}"
        asked = [
            ("what does the sign say?", _human_answers(word, [word.upper(), f"{word} sign", "unanswerable"], rng)),
            ("what color is the sign?", _human_answers(color, [f"{color} and white", "white", f"dark {color}"], rng)),
        ]
        for question, answers in asked:
            rows.append(
                {
                    "image_id": image_id,
                    "question_id": len(rows),
                    "question": question,
                    "question_tokens": question.rstrip("?").split() + ["?"],
                    "image": scene,
                    "image_width": scene.width,
                    "image_height": scene.height,
                    "flickr_original_url": "",
                    "flickr_300k_url": "",
                    "answers": answers,
                    "image_classes": ["Street sign"],
                    "set_name": "generated",
                    "ocr_tokens": [word.upper()],
                }
            )
    return rows[:num_rows]


def textvqa_features():
    from datasets import Features, Image, List, Value

    text = Value("string")
    return Features(
        {
            "image_id": text, "question_id": Value("int64"), "question": text, "question_tokens": List(text),
            "image": Image(), "image_width": Value("int64"), "image_height": Value("int64"),
            "flickr_original_url": text, "flickr_300k_url": text, "answers": List(text), "image_classes": List(text),
            "set_name": text, "ocr_tokens": List(text),
        }
    )  # fmt: skip


SHAPES = ["circle", "square", "triangle"]


def _shapes(rng: random.Random) -> tuple[Image.Image, dict[str, str]]:
    """Two or three differently coloured shapes; {shape: colour name}."""
    width, height = rng.randint(180, 320), rng.randint(120, 240)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    shown = rng.sample(SHAPES, rng.randint(2, 3))
    colors = rng.sample(list(COLORS), len(shown))
    slot = width // len(shown)
    for index, (shape, color) in enumerate(zip(shown, colors)):
        box = [index * slot + 10, height // 2 - 30, index * slot + 70, height // 2 + 30]
        fill = COLORS[color]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
    return image, dict(zip(shown, colors))


def make_scienceqa_rows(num_rows: int, seed: int = 0, **_: Any) -> list[dict[str, Any]]:
    """`num_rows` rows in lmms-lab/ScienceQA's (ScienceQA-IMG) schema: `choices` and the `answer` index."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    while len(rows) < num_rows:
        image, colors = _shapes(rng)
        shape = rng.choice(list(colors))
        wrong = [color for color in COLORS if color != colors[shape]]
        choices = rng.sample(wrong, rng.randint(1, 3)) + [colors[shape]]
        rng.shuffle(choices)
        rows.append(
            {
                "image": image,
                "question": f"What color is the {shape}?",
                "choices": choices,
                "answer": choices.index(colors[shape]),
                "hint": "The picture shows shapes of different colors." if rng.random() < 0.5 else "",
                "task": "closed choice",
                "grade": f"grade{rng.randint(1, 6)}",
                "subject": "natural science",
                "topic": "colors",
                "category": "Identify colors",
                "skill": "Identify colors of shapes",
                "lecture": "",
                "solution": f"The {shape} is {colors[shape]}.",
            }
        )
    return rows


def scienceqa_features():
    from datasets import Features, Image, List, Value

    text = Value("string")
    return Features(
        {
            "image": Image(), "question": text, "choices": List(text), "answer": Value("int8"), "hint": text,
            "task": text, "grade": text, "subject": text, "topic": text, "category": text, "skill": text,
            "lecture": text, "solution": text,
        }
    )  # fmt: skip
