"""Batches by true length (text plus image tokens, from `vlm_recipes.data.lengths.TokenCounter`): rows of similar
length grouped into batches of a fixed size (`LengthGroupedSampler`), or rows packed into batches of up to a token
budget (`TokenBudgetBatchSampler`).

Batches of rows of similar true length: text plus image tokens, from `vlm_recipes.data.lengths.TokenCounter`.

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

from vlm_recipes.errors import RecipeError


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


# ---------------------------------------------------------------------------------------------------------------------
# Token-budget packing


def first_fit_decreasing(lengths: Sequence[int], capacity: int, order: Sequence[int] | None = None) -> list[list[int]]:
    """Row indices packed into bins of at most `capacity` tokens: longest row first, each into the first bin it fits
    (opened in turn), a new bin when none has room. A row is never split; rows of equal length go in `order` (default:
    by index). Raises `ValueError` for a row longer than `capacity`. O(rows x log bins): the bins' free room is kept in
    a max-tree, so the first bin with room is found by walking down from the root."""
    order = range(len(lengths)) if order is None else order
    rank = {index: position for position, index in enumerate(order)}
    rows = sorted(order, key=lambda index: (-lengths[index], rank[index]))
    if rows and lengths[rows[0]] > capacity:
        raise ValueError(f"row {rows[0]} has {lengths[rows[0]]:,} tokens, more than the capacity {capacity:,}")
    size = 1
    while size < max(1, len(rows)):
        size *= 2
    room = [-1] * (2 * size)  # leaves size..2*size-1: the bins' free room (-1: not opened yet); inner nodes: max
    bins: list[list[int]] = []
    for index in rows:
        need = lengths[index]
        if room[1] >= need:  # some open bin has room: the leftmost one
            node = 1
            while node < size:
                node = 2 * node if room[2 * node] >= need else 2 * node + 1
            bin_index = node - size
        else:
            bin_index = len(bins)
            bins.append([])
            node = size + bin_index
            room[node] = capacity
        bins[bin_index].append(index)
        room[node] -= need
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return bins


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """This process's batches of row indices, each packed first-fit-decreasing to at most `max_tokens` true tokens.

    The rows are packed once, over the whole dataset, so every epoch has the same number of batches (the Trainer fixes
    an epoch's steps from the first); rows of equal length are ordered by a seeded shuffle. Each epoch the batches are
    shuffled (seeded by the seed and the epoch, the same on every process) with the batch of the most tokens first, so
    an out-of-memory error shows at the first step. With several processes the batches are dealt out in turn, and the
    first ones repeated so that every process has as many (as accelerate's `even_batches` does)."""

    def __init__(
        self, lengths: Sequence[int], max_tokens: int, processes: int = 1, process_index: int = 0, seed: int = 0
    ):
        self.lengths = list(lengths)
        self.max_tokens = max_tokens
        self.processes, self.process_index = processes, process_index
        self.seed = seed
        self.epoch = 0
        ties = torch.randperm(len(self.lengths), generator=torch.Generator().manual_seed(seed)).tolist()
        self.bins = first_fit_decreasing(self.lengths, max_tokens, ties)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        """Every process's batches of this epoch, in training order (dealt out in turn)."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = [self.bins[index] for index in torch.randperm(len(self.bins), generator=generator).tolist()]
        if batches:
            fullest = max(range(len(batches)), key=lambda index: self.tokens(batches[index]))
            batches.insert(0, batches.pop(fullest))
        short = -len(batches) % self.processes
        return batches + batches[:short]

    def tokens(self, batch: Sequence[int]) -> int:
        return sum(self.lengths[index] for index in batch)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.global_batches()[self.process_index :: self.processes])

    def __len__(self) -> int:
        return -(-len(self.bins) // self.processes)


def token_budget_sampler(
    lengths: Sequence[int], max_tokens: int, processes: int = 1, process_index: int = 0, seed: int = 0
) -> TokenBudgetBatchSampler:
    """`TokenBudgetBatchSampler`, or a clear stop when a row alone is over the budget (a row is never split)."""
    if lengths and max(lengths) > max_tokens:
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        raise RecipeError(
            f"max_tokens_per_batch {max_tokens:,} is below the longest training row (row {longest} of the train "
            f"split: {lengths[longest]:,} tokens, text + image), and a row is never split. Raise max_tokens_per_batch "
            "to at least that, or set max_length (with too_long: drop) or a lower image_max_pixels so that no row "
            "is longer."
        )
    return TokenBudgetBatchSampler(lengths, max_tokens, processes, process_index, seed)
