"""Bag (multivalent) features: a variable-length set of IDs per example (a movie's genres, its tags), embedded as
the sum or mean of its IDs' embeddings under any scheme, through :func:`embed_bags` (docs/schemes.md, "Bag features").

Where the pooling happens depends on the scheme module (:func:`bag_route`): a table-backed module whose
``combine`` is linear has its rows pooled over each whole bag by the table kernel, then one ``combine`` per bag;
a module with its own ``embed_bags`` (DHE) pools as it says; any other module embeds each ID and the embeddings
are pooled (a segment sum over the bags' offsets).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import nn

from embbench.errors import ConfigError, closest
from embbench.kernels import offsets_of
from embbench.schemes import FeatureSpec
from embbench.tables import Lookup, TableBackedEmbedding, _collection_of
from embbench.vocabulary import lookup_sorted

if TYPE_CHECKING:
    from embbench.data import Dataset
    from embbench.tasks import Task, TaskData

#: how a bag's embeddings are pooled: their sum, or their mean (the sum times 1/len)
BAG_MODES = ("sum", "mean")
#: where a module's bags are pooled (see :func:`bag_route`)
BAG_ROUTES = ("own", "rows", "each")


@dataclass(frozen=True, eq=False)
class Bags:
    """A batch of B bags of IDs, jagged: bag b holds ``values[offsets[b]:offsets[b + 1]]`` (offsets rise from 0 to
    len(values)); none at all is an empty bag, embedded as a zero vector. ``mode`` pools a bag's embeddings:
    ``sum`` or ``mean``."""

    values: torch.Tensor
    offsets: torch.Tensor
    mode: str = "sum"

    def __post_init__(self) -> None:
        if self.mode not in BAG_MODES:
            raise ValueError(f"bag mode must be one of {', '.join(BAG_MODES)}, got '{self.mode}'")
        if self.values.dim() != 1 or self.offsets.dim() != 1 or self.offsets.numel() < 1:
            raise ValueError(
                f"bags need 1-D values and 1-D offsets [B + 1], got shapes {tuple(self.values.shape)} and "
                f"{tuple(self.offsets.shape)}"
            )

    @classmethod
    def from_lengths(cls, values: torch.Tensor, lengths: torch.Tensor, mode: str = "sum") -> Bags:
        """Bags of ``lengths[b]`` consecutive values each."""
        return cls(values, offsets_of(lengths.to(torch.int64)), mode)

    @property
    def count(self) -> int:
        """B, the number of bags."""
        return int(self.offsets.numel()) - 1

    @property
    def device(self) -> torch.device:
        return self.values.device

    @functools.cached_property
    def lengths(self) -> torch.Tensor:
        """int64 [B]: the IDs in each bag."""
        return self.offsets.diff()

    @functools.cached_property
    def positions(self) -> torch.Tensor:
        """int64 [V]: the bag each value belongs to."""
        bag = torch.arange(self.count, device=self.device)
        return torch.repeat_interleave(bag, self.lengths, output_size=int(self.values.numel()))

    def pool(self, vectors: torch.Tensor) -> torch.Tensor:
        """[B, d] from the values' vectors [V, d]: each bag's sum (or mean); zeros for an empty bag."""
        summed = vectors.new_zeros(self.count, vectors.shape[1]).index_add(0, self.positions, vectors)
        return self.finish(summed)

    def finish(self, summed: torch.Tensor) -> torch.Tensor:
        """Bag sums [B, d] as the mode says: as they are, or times 1/len (an empty bag stays zero)."""
        if self.mode == "sum":
            return summed
        return summed / self.lengths.clamp(min=1).to(summed.dtype).unsqueeze(1)

    def regroup(self, lookup: Lookup) -> Lookup:
        """The reads ``lookup`` makes for the values, one ID after another, as one read per bag: the same rows
        (and per-row weights), each bag pooling all the rows of its IDs."""
        values, lengths, weights = lookup.bags()
        ends = torch.cat((lengths.new_zeros(1), torch.cumsum(lengths, 0)))
        return Lookup(lookup.table, values, ends[self.offsets[1:]] - ends[self.offsets[:-1]], weights)


def bag_route(module: nn.Module) -> str:
    """Where ``module`` pools bags: ``own`` (the module's ``embed_bags``), ``rows`` (a table-backed module whose
    ``combine_is_linear``: the table kernel pools each bag's rows, then one combine per bag) or ``each`` (each
    ID embedded, the embeddings pooled)."""
    if callable(getattr(module, "embed_bags", None)):
        return "own"
    if isinstance(module, TableBackedEmbedding) and module.combine_is_linear:
        return "rows"
    return "each"


def embed_bags(module: nn.Module, bags: Bags) -> torch.Tensor:
    """[B, dim]: the embedding of each bag under a scheme module (any scheme): the pool (``bags.mode``) of its
    IDs' embeddings; an empty bag gives a zero vector. A table-backed module in a model's collection pools in
    the collection's kernel."""
    route = bag_route(module)
    if route == "own":
        return module.embed_bags(bags)  # type: ignore[operator]
    if route == "rows":
        assert isinstance(module, TableBackedEmbedding)
        collection = _collection_of(module)
        if collection is not None:
            return collection.embed_modules([(module, bags)])[0]
        reads = table_reads(module, bags)
        return combine_reads(module, bags, [lookup.table.pool(lookup) for lookup in reads])
    return bags.pool(module(bags.values))


# -- a table-backed module's reads of IDs or of bags (the collection's batched path) ------------------------------
def request_size(request: torch.Tensor | Bags) -> int:
    """Embeddings a request gives: one per ID, or one per bag."""
    return request.count if isinstance(request, Bags) else int(request.shape[0])


def table_reads(module: TableBackedEmbedding, request: torch.Tensor | Bags) -> Sequence[Lookup]:
    """The table reads of ``module`` for IDs, or for bags (each bag pooling the rows of all its IDs)."""
    if not isinstance(request, Bags):
        return module.lookups(request)
    if not module.combine_is_linear:
        raise ValueError(f"{type(module).__name__}.combine is not linear: embed each ID of a bag, then pool")
    return [request.regroup(lookup) for lookup in module.lookups(request.values)]


def combine_reads(module: TableBackedEmbedding, request: torch.Tensor | Bags, pooled: Sequence[torch.Tensor]) -> (
    torch.Tensor
):
    """``module.combine`` of the pooled reads of :func:`table_reads`: for bags, once per bag (a linear combine
    reads of its IDs only their number: one stand-in ID 0 per bag), then the mode's 1/len for ``mean``."""
    if not isinstance(request, Bags):
        return module.combine(request, pooled)
    return request.finish(module.combine(request.offsets.new_zeros(request.count), pooled))


# -- bag features of a dataset ------------------------------------------------------------------------------------
def _jagged_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Positions ``starts[b] .. starts[b] + lengths[b] - 1`` of every b, one after the other."""
    firsts = np.cumsum(lengths) - lengths
    return np.repeat(starts - firsts, lengths) + np.arange(int(lengths.sum()))


@dataclass(frozen=True, eq=False)
class BagSource:
    """A dataset's bag feature: for each ``owner`` ID (``owner`` is the feature it belongs to, ``user`` or
    ``item``), a list of bag IDs. ``keys`` are the owner IDs, sorted and distinct; owner ``keys[i]`` holds
    ``values[offsets[i]:offsets[i + 1]]``; an owner ID that is not a key has an empty bag."""

    owner: str
    keys: np.ndarray
    offsets: np.ndarray
    values: np.ndarray

    def __post_init__(self) -> None:
        keys, offsets = np.asarray(self.keys), np.asarray(self.offsets)
        if keys.ndim != 1 or offsets.shape != (len(keys) + 1,) or np.asarray(self.values).ndim != 1:
            raise ValueError("a bag source needs keys [n], offsets [n + 1] and values [V], all 1-D")
        if len(keys) > 1 and not bool((np.diff(keys) > 0).all()):
            raise ValueError("a bag source's keys must be sorted and distinct")
        if offsets[0] != 0 or offsets[-1] != len(self.values) or bool((np.diff(offsets) < 0).any()):
            raise ValueError("a bag source's offsets must rise from 0 to the number of values")

    @classmethod
    def from_pairs(cls, owner: str, owner_ids: np.ndarray, bag_ids: np.ndarray) -> BagSource:
        """From (owner ID, bag ID) pairs in any order; a pair given twice counts once."""
        pairs = np.stack((np.asarray(owner_ids, np.int64), np.asarray(bag_ids, np.int64)), axis=1).reshape(-1, 2)
        pairs = np.unique(pairs, axis=0)  # sorted by owner, then bag ID
        keys, sizes = np.unique(pairs[:, 0], return_counts=True)
        offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        return cls(owner, keys.astype(np.int64), offsets, pairs[:, 1].copy())

    @classmethod
    def from_multi_hot(cls, owner: str, flags: pd.DataFrame) -> BagSource:
        """From 0/1 columns indexed by owner ID (e.g. genre flags): column j's flags are bag ID j."""
        rows, columns = np.nonzero(flags.to_numpy() != 0)
        return cls.from_pairs(owner, flags.index.to_numpy(dtype=np.int64)[rows], columns)

    def reindexed(self, owner_ids: np.ndarray) -> BagSource:
        """The bags keyed by position instead: key i holds the bag of ``owner_ids[i]`` (for a task that numbers the
        dataset's IDs 0..n-1)."""
        owner_ids = np.asarray(owner_ids, dtype=np.int64)
        lengths = np.zeros(len(owner_ids), np.int64)
        starts = np.zeros(len(owner_ids), np.int64)
        if len(self.keys):
            position = np.searchsorted(self.keys, owner_ids).clip(max=len(self.keys) - 1)
            known = self.keys[position] == owner_ids
            lengths = np.where(known, self.offsets[position + 1] - self.offsets[position], 0)
            starts = self.offsets[position]
        offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
        values = self.values[_jagged_positions(starts, lengths)]
        return BagSource(self.owner, np.arange(len(owner_ids), dtype=np.int64), offsets, values)

    def feature(self, name: str, owner: FeatureSpec) -> FeatureSpec:
        """The bag feature as training reads it: the distinct bag IDs of the owner's training IDs, each counted
        as often as training reads it (the training counts of the owners whose bags hold it)."""
        if len(self.keys):
            position = np.searchsorted(self.keys, owner.ids).clip(max=len(self.keys) - 1)
            known = self.keys[position] == owner.ids
            lengths = np.where(known, self.offsets[position + 1] - self.offsets[position], 0)
            read = self.values[_jagged_positions(self.offsets[position], lengths)]
        else:
            lengths, read = np.zeros(len(owner.ids), np.int64), np.zeros(0, np.int64)
        ids, inverse = np.unique(read, return_inverse=True)
        if not len(ids):
            raise ConfigError(f"bag feature '{name}' holds no ID for any training '{self.owner}'")
        counts = np.bincount(inverse, weights=np.repeat(np.asarray(owner.counts, np.float64), lengths))
        return FeatureSpec(name, ids.astype(np.int64), counts.round().astype(np.int64), owner.dim)


class BagIndex(nn.Module):
    """Owner IDs -> their bags (:class:`Bags`, pooled by ``mode``), from a :class:`BagSource`; an owner ID the
    source lacks has an empty bag. The lists are input data that arrive with the owner ID, like side features:
    non-persistent buffers, not part of any scheme's size."""

    def __init__(self, source: BagSource, mode: str = "mean") -> None:
        super().__init__()
        if mode not in BAG_MODES:
            raise ValueError(f"bag mode must be one of {', '.join(BAG_MODES)}, got '{mode}'")
        self.owner, self.mode = source.owner, mode
        offsets = torch.as_tensor(np.asarray(source.offsets, np.int64))
        none = torch.zeros(1, dtype=torch.int64)  # row n: the empty bag of an unknown owner ID
        self.register_buffer("keys", torch.as_tensor(np.asarray(source.keys, np.int64)), persistent=False)
        self.register_buffer("starts", torch.cat((offsets[:-1], none)), persistent=False)
        self.register_buffer("lengths", torch.cat((offsets.diff(), none)), persistent=False)
        self.register_buffer("values", torch.as_tensor(np.asarray(source.values, np.int64)), persistent=False)

    def forward(self, owner_ids: torch.Tensor) -> Bags:
        position, known = lookup_sorted(self.keys, owner_ids)
        position = torch.where(known, position, torch.full_like(position, self.keys.numel()))
        lengths = self.lengths[position]
        offsets = offsets_of(lengths)
        total = int(offsets[-1])
        bag = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths, output_size=total)
        flat = self.starts[position][bag] + torch.arange(total, device=lengths.device) - offsets[bag]
        return Bags(self.values[flat], offsets, self.mode)

    def extra_repr(self) -> str:
        return f"owner={self.owner}, mode={self.mode}, owners={self.keys.numel()}, ids={self.values.numel()}"


def attach_bags(task: Task, dataset: Dataset, data: TaskData, names: Sequence[str]) -> TaskData:
    """``data`` with the dataset's bag features ``names`` added: each its own feature (planned from the budget
    like any), its lists (keyed by the task's IDs: :meth:`Task.bag_source`) in ``data.bags``. ConfigError when the
    dataset has no such bag or the task takes none of its owner (:attr:`Task.bag_owners`)."""
    if not names:
        return data
    offered: Mapping[str, BagSource] = dataset.bag_features()
    for name in names:
        if name not in offered:
            listed = ", ".join(sorted(offered)) or "none"
            raise ConfigError(
                f"bags: {dataset!r} has no bag feature '{name}'{closest(name, list(offered))}; it offers: {listed}"
            )
    features, sources = dict(data.features), dict(data.bags)
    for name in names:
        source = offered[name]
        if name in features:
            raise ConfigError(f"bags: bag feature '{name}' has the name of a feature the task already embeds")
        if source.owner not in task.bag_owners or source.owner not in data.features:
            owners = ", ".join(task.bag_owners) or "no feature"
            raise ConfigError(
                f"bags: bag feature '{name}' belongs to '{source.owner}', and task {type(task).__name__} takes bags "
                f"of {owners}"
            )
        source = task.bag_source(data, source)
        features[name] = source.feature(name, data.features[source.owner])
        sources[name] = source
    return dataclasses.replace(data, features=features, bags=sources)


def select_bags(data: TaskData, names: Sequence[str]) -> TaskData:
    """``data`` with only the bag features ``names`` (a suite may attach several; each cell embeds its own)."""
    if sorted(names) == sorted(data.bags):
        return data
    dropped = set(data.bags) - set(names)
    return dataclasses.replace(
        data,
        features={name: spec for name, spec in data.features.items() if name not in dropped},
        bags={name: source for name, source in data.bags.items() if name not in dropped},
    )
