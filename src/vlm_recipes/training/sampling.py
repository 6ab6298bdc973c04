"""Batches of rows of similar true length: text plus image tokens, from `vlm_recipes.data.lengths.TokenCounter`.

Real ChartQA images differ in size, so their image-token counts differ several-fold, and a random batch of 8 is largely
padding (40-50%). Grouping by text length does not help (image size is independent of it), and transformers'
`train_sampling_strategy="group_by_length"` needs a `length` column that TRL's vision trainer drops. Here:

- the rows are shuffled (seeded by the recipe's seed and the epoch, so every process draws the same order),
- cut into mega-batches of `length_group_batches` global batches, each sorted by true length, longest first,
- cut into global batches (`per_device_train_batch_size` x processes rows, one optimizer micro-step of every process),
  whose order inside the mega-batch is shuffled again; a last, partial batch stays last,
- the batch with the longest row goes first, so an out-of-memory error shows at the first step, not hours in.

Under DDP, accelerate hands consecutive per-device batches to the processes in turn, so the processes of one step get
rows of similar length too (none waits long for the others).
"""

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Row indices in length-grouped order. `lengths[i]` is row i's true token count."""

    def __init__(
        self,
        lengths: Sequence[int],
        per_device_batch_size: int,
        processes: int = 1,
        group_batches: int = 64,
        seed: int = 0,
    ):
        self.lengths = list(lengths)
        self.global_batch = per_device_batch_size * processes
        self.group_batches = max(1, group_batches)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order())

    def batches(self) -> list[list[int]]:
        """The global batches of this epoch, in training order."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        shuffled = torch.randperm(len(self.lengths), generator=generator).tolist()
        group_rows = self.global_batch * self.group_batches
        full, partial = [], []
        for start in range(0, len(shuffled), group_rows):
            group = sorted(shuffled[start : start + group_rows], key=self.lengths.__getitem__, reverse=True)
            batches = [group[index : index + self.global_batch] for index in range(0, len(group), self.global_batch)]
            if len(batches[-1]) < self.global_batch:
                partial = [batches.pop()]  # only the last mega-batch can end short
            full.extend(batches[i] for i in torch.randperm(len(batches), generator=generator).tolist())
        if full:
            longest = max(range(len(full)), key=lambda index: self.lengths[full[index][0]])
            full.insert(0, full.pop(longest))
        return full + partial

    def order(self) -> list[int]:
        return [index for batch in self.batches() for index in batch]
