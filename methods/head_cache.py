"""A draft head's own KV cache over a ragged batch, and how a head is fed into it.

`DraftKV` is append-only with a per-row mask of real slots, like the engine's, so the head
reads each committed token once, not every step. What a head is fed: EAGLE's input at
position i is the embedding of token i+1 beside the target's feature at i; image slots are
embedded with the projected image features the target saw (the `EMBEDS` feature), so the head
sees the picture too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mmspec.methods.kv_slots import (
    SlotCache,
    additive_mask,
    cat_rows,
    gather_slots,
    keep_rows,
    pad_left,
    squeeze_order,
)


class DraftKV:
    """KV cache of a one-layer draft head for the rows of a batch.

    `feed` appends m slots per row (row i's first counts[i] real, the rest masked padding);
    `crop` drops slots appended after a given length (tree levels after drafting).
    """

    def __init__(self, batch: int, device: torch.device, compact_slack: int = 64) -> None:
        self.cache = SlotCache()
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.compact_slack = compact_slack

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def visible_for(self, new_visible: torch.Tensor) -> torch.Tensor:
        """(b, q, length + q) bool: every valid cached slot, then `new_visible` (b, q, q)."""
        q = new_visible.shape[1]
        return torch.cat([self.valid[:, None, :].expand(-1, q, -1), new_visible], dim=-1)

    def append_valid(self, kept: torch.Tensor) -> None:
        self.valid = torch.cat([self.valid, kept], dim=1)

    def crop(self, length: int) -> None:
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]
        self.valid = self.valid[:, :length]

    def select(self, keep: list[int]) -> None:
        """Keep only the rows `keep` (indices into the current rows, in their new order; the
        engine's leave the rows in place but for the last ones, moved into holes: then in
        place, `keep_rows`)."""
        keep_rows(self.cache, keep)
        idx = torch.tensor(keep, device=self.valid.device)
        self.valid = self.valid.index_select(0, idx)
        self.next_pos = self.next_pos.index_select(0, idx)

    def extend(self, other: DraftKV) -> None:
        """Append `other`'s rows after these (rows joining a batch). The shorter side is left
        padded with masked slots: positions are explicit per row, so a slot's index means
        nothing to it. Either side may hold no layers yet (nothing fed): its rows get masked
        zero slots in the other's layers."""
        width = max(self.length, other.length)
        rows = (self.valid.shape[0], other.valid.shape[0])
        self.cache = cat_rows(self.cache, other.cache, rows, width)
        self.valid = torch.cat([pad_left(self.valid, width, 1), pad_left(other.valid, width, 1)])
        self.next_pos = torch.cat([self.next_pos, other.next_pos])

    def maybe_compact(self) -> None:
        """Squeeze masked slots out once they cost more than `compact_slack` per row."""
        order = squeeze_order(self.valid, self.compact_slack)
        if order is not None:
            gather_slots(self.cache, order)
            self.valid = torch.gather(self.valid, 1, order)


def ragged(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Right-pad per-row (n_i, ...) tensors to (b, max n, ...); returns the counts too."""
    counts = [r.shape[0] for r in rows]
    out = rows[0].new_zeros(len(rows), max(counts), *rows[0].shape[1:])
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out, counts


def feed(
    kv: DraftKV,
    step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    positions: torch.Tensor,
    counts: Sequence[int],
) -> torch.Tensor:
    """Run the head over m new positions per row (causal), appending them to the cache.

    `step(inputs, positions, mask)` runs the head on `kv.cache` and returns its (b, m, h)
    output. Row i's slots past counts[i] are padding: computed, then masked forever. The
    next position of a row is one past its last real one.
    """
    m = inputs.shape[1]
    dev = inputs.device
    counts_t = torch.tensor(list(counts), device=dev)
    real = torch.arange(m, device=dev)[None, :] < counts_t[:, None]  # (b, m)
    causal = torch.tril(torch.ones(m, m, dtype=torch.bool, device=dev))
    # a padding query sees itself, so no row of the mask is empty (NaN-free)
    new_visible = (causal[None] & real[:, None, :]) | torch.eye(m, dtype=torch.bool, device=dev)
    mask = additive_mask(kv.visible_for(new_visible), inputs.dtype)
    out = step(inputs, positions, mask)
    kv.append_valid(real)
    kv.next_pos = last_real(positions[..., None], counts)[:, 0] + 1
    return out


def last_real(out: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """(b, m, h) -> (b, h): each row's output at its last real position."""
    idx = torch.tensor([c - 1 for c in counts], device=out.device)
    return out[torch.arange(out.shape[0], device=out.device), idx]
