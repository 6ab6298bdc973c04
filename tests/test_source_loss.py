"""The training loss per data source (`training.source_loss`): token losses grouped by each row's source, padded and
packed, summed until a log; and the plot's panel of them. The trainer-level and entry-point checks are in
tests/test_mixture.py, on its two-source registry."""

import torch

from vlm_recipes.data.loading import DATA_SOURCE
from vlm_recipes.training.padding_free import unpack_positions
from vlm_recipes.training.plots import panels_for
from vlm_recipes.training.source_loss import (
    SOURCE_IDS,
    SourceIdCollator,
    SourceLosses,
    mixture_sources,
    packed_rows,
)


class OneProcess:
    num_processes = 1
    device = torch.device("cpu")


def padded_batch():
    """Three rows (sources 1, 0, 1) of next-token log-probabilities, zero where unlabelled, with their label mask."""
    label_mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    log_probs = -torch.arange(1, 13, dtype=torch.float32).view(3, 4) / 10 * label_mask
    return log_probs, label_mask, torch.tensor([1, 0, 1])


def test_token_losses_add_up_by_source_and_restart_after_each_log():
    log_probs, label_mask, sources = padded_batch()
    losses = SourceLosses(("a", "b"))
    losses.add(log_probs, label_mask, sources)
    logs = losses.pop_logs(OneProcess())
    assert logs.keys() == {"loss/a", "loss/b"}
    assert abs(logs["loss/a"] - (0.7 + 0.8) / 2) < 1e-6  # row 1 only
    assert abs(logs["loss/b"] - (0.2 + 0.3 + 0.9 + 1.0 + 1.1) / 5) < 1e-6  # rows 0 and 2
    # The token-weighted mean of the sources is TRL's loss of the batch (the token mean)
    assert abs((logs["loss/a"] * 2 + logs["loss/b"] * 5) / 7 - float(-log_probs.sum() / label_mask.sum())) < 1e-6
    losses.add(log_probs[:1], label_mask[:1], sources[:1])  # a row of b only: no loss/a in the next log
    assert losses.pop_logs(OneProcess()) == {"loss/b": (0.2 + 0.3) / 2}
    assert losses.pop_logs(OneProcess()) == {}  # nothing since the last log
    # A row whose source the training rows do not have (-1) counts nowhere
    losses.add(log_probs, label_mask, torch.tensor([-1, 0, -1]))
    assert losses.pop_logs(OneProcess()).keys() == {"loss/a"}


def test_packed_positions_go_back_to_their_rows():
    """The same rows right-padded and packed as `pack_rows` packs them: the same sums per source."""
    attention_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    assert packed_rows(attention_mask).tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 2, 2]
    tokens = int(attention_mask.sum())
    packed = -torch.rand(1, tokens - 1)
    label_mask = torch.ones(1, tokens - 1, dtype=torch.bool)
    label_mask[0, [2, 7]] = False  # each row's first token is unlabelled when packed (`pack_rows`)
    packed = packed * label_mask
    sources = torch.tensor([0, 1, 0])
    from_packed = SourceLosses(("a", "b"))
    from_packed.add(packed, label_mask, sources, packed_rows(attention_mask))
    from_padded = SourceLosses(("a", "b"))
    from_padded.add(unpack_positions(packed, attention_mask), unpack_positions(label_mask, attention_mask), sources)
    assert from_packed.pop_logs(OneProcess()) == from_padded.pop_logs(OneProcess())


def test_dft_losses_weigh_each_token_by_its_probability_like_trl():
    log_probs, label_mask, sources = padded_batch()
    losses = SourceLosses(("a", "b"), loss_type="dft")
    losses.add(log_probs, label_mask, sources)
    expected = float((-log_probs * log_probs.exp())[1].sum() / 2)
    assert abs(losses.pop_logs(OneProcess())["loss/a"] - expected) < 1e-6


def test_the_collator_adds_each_rows_source_index_and_hides_the_column():
    from datasets import Dataset

    seen = []

    def collate(examples):
        seen.extend(examples)
        return {"input_ids": torch.zeros(len(examples), 2)}

    rows = Dataset.from_dict({"text": ["x", "y", "z"], DATA_SOURCE: ["web", "charts", "web"]})
    names = mixture_sources(rows)
    assert names == ("charts", "web")
    assert mixture_sources(rows.select([0, 2])) is None  # one source: nothing to split
    assert mixture_sources(rows.remove_columns(DATA_SOURCE)) is None
    assert mixture_sources(rows.to_iterable_dataset()) is None  # a stream: its sources are not known up front
    collator = SourceIdCollator(collate, names)
    batch = collator([*rows, {"text": "w", DATA_SOURCE: "new"}])
    assert batch[SOURCE_IDS].tolist() == [1, 0, 1, -1]
    assert all(DATA_SOURCE not in example for example in seen)


def test_the_plot_draws_one_line_per_source_in_its_own_panel():
    log = [{"step": 1, "loss": 1.0, "loss/charts": 0.8, "loss/web": 1.4}, {"step": 2, "loss": 0.9, "loss/web": 1.2}]
    panels = {panel.title: keys for panel, keys in panels_for(log, ("loss", "eval_loss"), ())}
    assert panels["loss"] == ["loss"]
    assert panels["training loss per source"] == ["loss/charts", "loss/web"]
