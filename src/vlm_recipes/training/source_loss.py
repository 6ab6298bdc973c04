"""The training loss per data source (`loss/<source>`), for a mixture whose rows carry `data_source`: SFT and DPO.

A mixture's rows name their source (`data.loading.DATA_SOURCE`). When the training rows come from two sources or more:
- the trainer keeps the `data_source` column for its collator (TRL would drop it as unused), and `SourceIdCollator`
  turns each batch's names into one index per row (`data_source_ids`, a long tensor; the names stay on the trainer);
- SFT: `compute_loss` takes the index out of the batch before the model sees it and, around TRL's own loss, records the
  per-token log-probabilities of TRL's fused LM head (`recorded_token_losses`): the same labelled positions and values
  the loss is made of, so no second forward. A packed sequence's positions go back to their rows by the batch's
  attention mask (`packed_rows`), as `training.padding_free.pack_rows` packed them;
- DPO: around TRL's own loss, each pair's loss before TRL's mean over the batch, for the recipe's loss types and
  weights, and whether its chosen reward is above its rejected (`compat.recorded_pair_results`): TRL's values, no
  second computation; packing changes nothing (the pair's values are per pair);
- `SourceLosses` (SFT: token losses) and `PairSourceResults` (DPO: pair losses, reward accuracies) add each source's
  values and counts until the next log, where the sums of every process are added up and `loss/<source>` (their
  mean; DPO also `rewards/accuracies/<source>`) joins the logged values, so every `report_to` logger and
  training_log.json get it.

SFT's `loss/<source>` is a token mean over all the source's labelled tokens since the last log: within one logged step
the token-weighted mean of the per-source losses is the logged `loss` (TRL's loss is the token mean of the global batch,
`compat.count_tokens_of_global_batch`). DPO's is a pair mean: the pair-weighted mean of the per-source losses is the
logged `loss` (TRL's loss is the mean over pairs; a MoE router's auxiliary loss, where on, is in `loss` only). Over
several steps per log, `loss` is the mean of the steps' means.
Rows without `data_source`, or from one source: nothing of this runs.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from vlm_recipes.data.loading import DATA_SOURCE


SOURCE_IDS = "data_source_ids"  # the batch key of each row's source index
LOSS_PREFIX = "loss/"
ACCURACY_PREFIX = "rewards/accuracies/"  # DPO: the share of a source's pairs whose chosen reward is above the rejected


def mixture_sources(dataset: Any) -> tuple[str, ...] | None:
    """The names of the sources of a dataset's rows, sorted; None without a `data_source` column, with one source, or
    for a stream (`streaming: true`: its sources are not known before it is read)."""
    if not hasattr(dataset, "unique") or DATA_SOURCE not in (getattr(dataset, "column_names", None) or ()):
        return None
    names = tuple(sorted(set(dataset.unique(DATA_SOURCE))))
    return names if len(names) > 1 else None


class SourceIdCollator:
    """The trainer's collator, and each row's source as an index into `names` (`data_source_ids`; -1 for a source the
    training rows do not have). Every other attribute is the wrapped collator's."""

    def __init__(self, collator: Any, names: tuple[str, ...]):
        self.collator = collator
        self.index = {name: position for position, name in enumerate(names)}

    def __getattr__(self, name: str) -> Any:
        if name == "collator":  # not set yet (a copy being made, a worker unpickling): no endless lookup
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        source_ids = torch.tensor([self.index.get(example.get(DATA_SOURCE), -1) for example in examples])
        batch = self.collator(
            [{key: value for key, value in example.items() if key != DATA_SOURCE} for example in examples]
        )
        batch[SOURCE_IDS] = source_ids
        return batch


def packed_rows(attention_mask: torch.Tensor) -> torch.Tensor:
    """For a batch packed by `pack_rows`: the row of each token of the packed sequence, shape (tokens,)."""
    keep = attention_mask.bool()
    rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)
    return rows[keep]


@contextmanager
def recorded_token_losses(model: Any) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Within the block, the (log_probs, label_mask) of every forward of `model` (unwrapped, PEFT allowed) that runs
    TRL's fused LM head (`fused_lm_head=True`), detached: shape (rows, length - 1), position t predicting token t + 1."""
    recorded: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(module: Any, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        log_probs, label_mask = getattr(output, "log_probs", None), getattr(output, "label_mask", None)
        if log_probs is not None and label_mask is not None:
            recorded.append((log_probs.detach(), label_mask))

    handle = model.register_forward_hook(keep, with_kwargs=True)
    try:
        yield recorded
    finally:
        handle.remove()


class SourceMeans:
    """Each source's sum of values and count of values since the last log; at the log, `<prefix><source>`: their mean
    over all processes."""

    def __init__(self, names: tuple[str, ...], prefix: str = LOSS_PREFIX):
        self.names = names
        self.prefix = prefix
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def add_values(self, values: torch.Tensor, sources: torch.Tensor) -> None:
        """Values (1-D) with the source index of each; a source index of -1 counts nowhere."""
        values, sources = values.detach().float().flatten(), sources.to(values.device).flatten()
        counted = sources >= 0
        if self.sums is None:
            self.sums = torch.zeros(len(self.names), dtype=torch.float32, device=values.device)
            self.counts = torch.zeros(len(self.names), dtype=torch.float32, device=values.device)
        self.sums.index_add_(0, sources[counted], values[counted])
        self.counts.index_add_(0, sources[counted], torch.ones_like(values[counted]))

    def pop_logs(self, accelerator: Any) -> dict[str, float]:
        """`<prefix><source>` for every source with values since the last log, over all processes; the sums restart.
        Every process must call it at the same log (the sums are added up across processes)."""
        if self.sums is None:
            self.sums = torch.zeros(len(self.names), dtype=torch.float32, device=accelerator.device)
            self.counts = torch.zeros_like(self.sums)
        totals = torch.stack([self.sums, self.counts]).to(accelerator.device)
        if accelerator.num_processes > 1:
            totals = accelerator.reduce(totals, reduction="sum")
        sums, counts = totals.tolist()
        self.sums = self.counts = None
        return {
            f"{self.prefix}{name}": total / count for name, total, count in zip(self.names, sums, counts) if count > 0
        }


class SourceLosses(SourceMeans):
    """SFT: each source's sum of token losses and count of labelled tokens since the last log (`loss/<source>`, the
    token mean)."""

    def __init__(self, names: tuple[str, ...], loss_type: str = "nll"):
        super().__init__(names, LOSS_PREFIX)
        self.loss_type = loss_type

    def add(
        self,
        log_probs: torch.Tensor,
        label_mask: torch.Tensor,
        source_ids: torch.Tensor,
        token_rows: torch.Tensor | None = None,
    ) -> None:
        """One forward's token losses by source. `token_rows`: for a packed sequence (`log_probs` of shape
        (1, tokens - 1)), the row of each of its tokens (`packed_rows`); None for a padded batch."""
        per_token = -log_probs.float()  # TRL's SFT loss, token by token (zero where unlabelled)
        if self.loss_type == "dft":  # TRL's DFT weighting, as its loss applies it
            per_token = per_token * log_probs.float().exp()
        if token_rows is None:
            rows = torch.arange(log_probs.shape[0], device=log_probs.device)[:, None].expand_as(log_probs)
        else:
            rows = token_rows[1:].to(log_probs.device)[None]  # position t predicts token t + 1, of that token's row
        labelled = label_mask.bool()
        self.add_values(per_token[labelled], source_ids.to(log_probs.device)[rows][labelled])


class PairSourceResults:
    """DPO: each source's mean pair loss (`loss/<source>`) and reward accuracy (`rewards/accuracies/<source>`) since
    the last log, over all processes."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.losses = SourceMeans(names, LOSS_PREFIX)
        self.accuracies = SourceMeans(names, ACCURACY_PREFIX)

    def add(self, pair_losses: torch.Tensor, reward_accuracies: torch.Tensor | None, source_ids: torch.Tensor) -> None:
        """One batch's pairs: their losses, 1.0 where the chosen reward is above the rejected (or None), sources."""
        self.losses.add_values(pair_losses, source_ids)
        if reward_accuracies is not None:
            self.accuracies.add_values(reward_accuracies, source_ids)

    def pop_logs(self, accelerator: Any) -> dict[str, float]:
        return {**self.losses.pop_logs(accelerator), **self.accuracies.pop_logs(accelerator)}
