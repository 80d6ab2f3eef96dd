"""The dense index of a feature's training vocabulary: raw IDs -> 0..n-1 by rank, n for any unseen ID.

Shared by the schemes that give every known ID its own index (compositional, binary-code, ...). The ID
dictionary is part of such a scheme's size, so it is stored in the cheapest of three exact encodings:

- ``run``: the IDs are first, first+1, ..., first+n-1; only ``first`` is stored (8 bytes);
- ``bitmap``: one bit per ID in [first, last] (plus ``first``), ranks from a prefix count; MovieLens-like
  vocabularies of small, dense integer IDs cost about 1/8 byte per possible ID;
- ``sorted``: the sorted offsets ID - first in the narrowest unsigned width that holds them (1, 2, 4 or 8
  bytes each, plus ``first``); spread-out IDs (hashes, 64-bit keys) end here.

Derived look-up structures (the bitmap's prefix counts) are rebuilt from the stored state, like a cache,
and are not counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from embbench.schemes import ID_BYTES

_OFFSET_DTYPES = ((1, np.uint8, torch.uint8), (2, np.uint16, torch.int16), (4, np.uint32, torch.int32))


def is_contiguous(ids: np.ndarray) -> bool:
    """Whether sorted distinct ``ids`` are a run first, first+1, ..., first+n-1."""
    return len(ids) > 0 and int(ids[-1]) - int(ids[0]) == len(ids) - 1


def _span(ids: np.ndarray) -> int:
    return int(ids[-1]) - int(ids[0]) + 1 if len(ids) else 0


def _offset_width(span: int) -> int:
    """Bytes per stored offset for offsets below ``span``."""
    for width, _, _ in _OFFSET_DTYPES:
        if span <= 1 << (8 * width - (1 if width > 1 else 0)):  # int16/int32 stay non-negative
            return width
    return ID_BYTES


def encoding_sizes(ids: np.ndarray) -> dict[str, int]:
    """Bytes each encoding would store for the sorted distinct ``ids`` (the cheapest is used)."""
    if len(ids) == 0:
        return {"sorted": 0}
    span = _span(ids)
    sizes = {"sorted": ID_BYTES + len(ids) * _offset_width(span), "bitmap": ID_BYTES + -(-span // 8)}
    if is_contiguous(ids):
        sizes["run"] = ID_BYTES
    return sizes


def lookup_sorted(sorted_ids: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each ID's position in the sorted int64 ``sorted_ids`` (clamped into range) and whether it is there.

    The one dictionary look-up every scheme with a sorted ID buffer shares; an empty buffer finds nothing.
    """
    if sorted_ids.numel() == 0:
        return torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    position = torch.searchsorted(sorted_ids, ids).clamp_(max=sorted_ids.numel() - 1)
    return position, sorted_ids[position] == ids


class VocabularyIndex(nn.Module):
    """Raw IDs -> dense index: the rank 0..n-1 in the sorted training vocabulary, n for any unseen ID."""

    def __init__(self, vocabulary: np.ndarray) -> None:
        super().__init__()
        ids = np.asarray(vocabulary, dtype=np.int64)
        self.num_ids = int(len(ids))
        sizes = encoding_sizes(ids)
        self.encoding = min(sizes, key=lambda name: (sizes[name], name != "run"))
        if self.num_ids == 0:
            return
        self.first_id, self.last_id = int(ids[0]), int(ids[-1])
        self.register_buffer("vocabulary_start", torch.tensor([self.first_id], dtype=torch.int64))
        # Offsets from the first ID, computed in uint64 so that spans up to 2^64 - 1 cannot overflow.
        offsets = ids.astype(np.uint64) - np.uint64(ids[0])
        if self.encoding == "bitmap":
            present = np.zeros(_span(ids), dtype=bool)
            present[offsets.astype(np.int64)] = True
            self.register_buffer("vocabulary_bitmap", torch.from_numpy(np.packbits(present, bitorder="little")))
            self.register_buffer("_ranks", torch.empty(0, dtype=torch.int64), persistent=False)
            self._rebuild_ranks()
        elif self.encoding == "sorted":
            width = _offset_width(_span(ids))
            if width == ID_BYTES:
                stored = torch.from_numpy(ids.copy())
            else:
                numpy_type, torch_type = next((n, t) for w, n, t in _OFFSET_DTYPES if w == width)
                stored = torch.from_numpy(offsets.astype(numpy_type)).to(torch_type)
            self.register_buffer("vocabulary_offsets", stored)
            # searchsorted needs int64 keys: derived, rebuilt from the stored offsets, not counted.
            self.register_buffer("_sorted", torch.empty(0, dtype=torch.int64), persistent=False)
            self._rebuild_sorted()

    @staticmethod
    def size_bytes(vocabulary: np.ndarray) -> int:
        """Bytes of state the index of ``vocabulary`` stores (the cheapest encoding)."""
        return min(encoding_sizes(np.asarray(vocabulary, dtype=np.int64)).values())

    def _rebuild_ranks(self) -> None:
        bits = self.vocabulary_bitmap.to(torch.int64)
        present = ((bits.unsqueeze(1) >> torch.arange(8)) & 1).flatten()[: self.last_id - self.first_id + 1]
        # rank of offset o = number of present offsets below o; -1 marks an absent offset.
        ranks = torch.cumsum(present, 0) - 1
        self._ranks = torch.where(present.bool(), ranks, torch.full_like(ranks, -1))

    def _rebuild_sorted(self) -> None:
        stored = self.vocabulary_offsets
        if stored.dtype == torch.int64:
            self._sorted = stored.clone()
            return
        # Narrow offsets are stored below their type's signed limit (see _offset_width), so they widen as is.
        self._sorted = stored.to(torch.int64) + self.first_id

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.encoding == "bitmap":
            self._rebuild_ranks()
        elif self.encoding == "sorted" and self.num_ids:
            self._rebuild_sorted()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        unseen = torch.full_like(ids, self.num_ids)
        if self.num_ids == 0:
            return unseen
        # Clamp before subtracting, so that IDs near ±2^63 cannot overflow.
        clamped = ids.clamp(self.first_id, self.last_id)
        in_range = clamped == ids
        if self.encoding == "run":
            return torch.where(in_range, clamped - self.vocabulary_start, unseen)
        if self.encoding == "bitmap":
            rank = self._ranks[clamped - self.vocabulary_start]
            return torch.where(in_range & (rank >= 0), rank, unseen)
        position, known = lookup_sorted(self._sorted, ids)
        return torch.where(known, position, unseen)

    def extra_repr(self) -> str:
        return f"num_ids={self.num_ids}, encoding={self.encoding}"
