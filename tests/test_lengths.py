"""The one token counter: its count equals what TRL's vision collator feeds the model, without running the processor."""

import os

import pytest
from PIL import Image

from vlm_recipes.data.lengths import TokenCounter, row_conversations


def user(*blocks):
    return {"role": "user", "content": list(blocks)}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


IMAGE = {"type": "image", "text": None}


def text(value):
    return {"type": "text", "text": value}


@pytest.fixture(scope="module")
def processor(tiny_qwen):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_qwen)


def sft_rows():
    return [
        {
            "images": [Image.new("RGB", (640, 480), "red")],
            "messages": [user(IMAGE, text("Value of Corn?")), assistant("42")],
        },
        {  # multi-image, multi-turn, with a system prompt
            "images": [Image.new("RGB", (1000, 300), "blue"), Image.new("RGB", (30, 900), "green")],
            "messages": [
                {"role": "system", "content": [text("Answer briefly.")]},
                user(IMAGE, text("and"), IMAGE, text("which is taller?")),
                assistant("The second."),
                user(text("And the first?")),
                assistant("Wide and low."),
            ],
        },
        {
            "images": [Image.new("RGB", (97, 61), "white")],
            "messages": [user(IMAGE, text("?")), assistant("A tiny chart.")],
        },
        {"images": [], "messages": [user(text("No image here, just a question.")), assistant("Just an answer.")]},
    ]


def test_count_equals_the_collators_non_padding_tokens(processor):
    from trl.chat_template_utils import get_training_chat_template
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    # As SFTTrainer builds it for assistant-only loss: TRL's training template swapped in, batch padded.
    collator = DataCollatorForVisionLanguageModeling(
        processor, assistant_only_loss=True, chat_template=get_training_chat_template(processor)
    )
    rows = sft_rows()
    batch = collator([dict(row) for row in rows])
    counter = TokenCounter(processor)
    expected = batch["attention_mask"].sum(dim=1).tolist()
    counts = [counter.count_row(row) for row in rows]
    assert [count.total for count in counts] == expected
    assert len(set(expected)) == len(expected)  # rows of different lengths: the batch really had padding
    # image tokens follow the processor's resize rule: (640x480 -> 644x476 after smart_resize) / 28^2
    assert counts[0].image == (644 // 28) * (476 // 28)
    assert counts[3].image == 0 and counts[1].placeholders == 2


def test_count_follows_the_recipes_pixel_bounds(processor, tiny_qwen):
    from transformers import AutoConfig, AutoProcessor

    from vlm_recipes.modeling.families import get_family
    from vlm_recipes.modeling.image_size import bound_image_size

    bounded = AutoProcessor.from_pretrained(tiny_qwen)
    bound_image_size(bounded, get_family(AutoConfig.from_pretrained(tiny_qwen)), None, 256 * 28 * 28)
    big = (2000, 1500)
    assert TokenCounter(processor).image_tokens(*big) > 256 >= TokenCounter(bounded).image_tokens(*big)
    output = bounded(text=["<|image_pad|>"], images=[Image.new("RGB", big)])
    assert len(output["input_ids"][0]) == TokenCounter(bounded).image_tokens(*big)


def test_sizes_come_from_headers_without_decoding(processor, tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (1200, 800), "white").save(path)
    row = {"images": [{"bytes": None, "path": str(path)}], "messages": [user(IMAGE, text("?")), assistant("x")]}
    counter = TokenCounter(processor)
    assert counter.row_tokens(row) == counter.count(row["messages"], [(1200, 800)]).total


def test_preference_rows_count_their_longest_pair(processor):
    prompt = [user(IMAGE, text("Describe the chart."))]
    row = {
        "images": [Image.new("RGB", (300, 200))],
        "prompt": prompt,
        "chosen": [assistant("A bar chart with four bars, the second the highest.")],
        "rejected": [assistant("A pie.")],
    }
    conversations = row_conversations(row)
    assert conversations == [prompt + row["chosen"], prompt + row["rejected"]]
    counter = TokenCounter(processor)
    chosen = counter.count(conversations[0], [(300, 200)])
    rejected = counter.count(conversations[1], [(300, 200)])
    assert counter.count_row(row) == chosen and chosen.total > rejected.total
    assert chosen.image == rejected.image > 0


def test_size_the_processor_refuses_raises(processor):
    with pytest.raises(ValueError, match="aspect ratio"):
        TokenCounter(processor).image_tokens(10000, 40)


def test_a_whole_split_is_counted_from_stored_rows_without_writing_a_cache(processor, chartqa_dir):
    """Every process of a launch counts the split for length-grouped batching: no image is decoded and no datasets
    cache file is written (which the other processes would race to write or to read)."""
    from vlm_recipes.configs import DataArguments
    from vlm_recipes.data.lengths import dataset_token_lengths
    from vlm_recipes.data.loading import load_datasets

    train = load_datasets(DataArguments(dataset_name=str(chartqa_dir), dataset_test_split=None))[0].shuffle(seed=3)
    caches = {file["filename"] for file in train.cache_files}
    folder = next(iter(caches)).rsplit("/", 1)[0]
    before = set(os.listdir(folder))
    counter = TokenCounter(processor)
    lengths = dataset_token_lengths(train, counter, chunk_rows=7)
    assert lengths == [counter.row_tokens(row) for row in train]  # decoded rows, in the shuffled order
    assert set(os.listdir(folder)) == before
