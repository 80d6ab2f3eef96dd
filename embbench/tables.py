"""Embedding tables, the building block of table-backed schemes, and the module API that lets a model look
up every table of every feature at once (torchrec's KeyedJaggedTensor -> EmbeddingBagCollection flow).

A table-backed scheme module subclasses :class:`TableBackedEmbedding`. It keeps its rows in
:class:`EmbeddingTable` modules and splits its forward in two: ``lookups(ids)`` says which rows of which tables
each ID pools (one :class:`Lookup` per table read), ``combine(ids, pooled)`` builds the embeddings from the
pooled rows (sum, product, concatenation, projection...). In a model, :class:`embbench.collection.FeatureEmbeddings`
holds the rows of all tables of all features in one collection and looks them all up in one call per batch;
standalone, ``forward`` reads each table itself. Both give the same embeddings.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional

if TYPE_CHECKING:
    from embbench.collection import TableCollection

DEFAULT_INIT_STD = 0.01


INIT_KINDS = ("normal", "uniform")


def initial_weights(num_rows: int, dim: int, seed: int, std: float = DEFAULT_INIT_STD) -> torch.Tensor:
    """The seeded N(0, std^2) rows a table starts from."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(num_rows, dim, generator=generator) * std


@dataclass(frozen=True)
class TableInit:
    """How a table's rows start: ``normal`` draws N(0, ``std``^2); ``uniform`` draws U(-b, b) with
    b = ``scale`` / sqrt(``fan``) (``scale`` 1 and ``fan`` the embedding dimension: the U(±d^-½) the reference code of
    Hash Embeddings, CCE and ROBE starts every table with); without ``fan``, the table's own width. Seeded by the
    table's seed: the same seed gives the same rows."""

    kind: str = "normal"
    std: float = DEFAULT_INIT_STD
    scale: float = 1.0
    fan: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in INIT_KINDS:
            raise ValueError(f"table init must be one of {', '.join(INIT_KINDS)}, got '{self.kind}'")
        if not (self.std >= 0 and self.scale > 0):
            raise ValueError(f"table init std must be >= 0 and scale > 0, got {self.std} and {self.scale}")

    def weights(self, num_rows: int, dim: int, seed: int) -> torch.Tensor:
        if self.kind == "normal":
            return initial_weights(num_rows, dim, seed, self.std)
        generator = torch.Generator().manual_seed(int(seed))
        bound = self.scale / (self.fan or dim) ** 0.5
        return (torch.rand(num_rows, dim, generator=generator) * 2 - 1) * bound

    def describe(self) -> str:
        if self.kind == "normal":
            return f"normal(0, {self.std:g}^2)"
        return f"uniform(±{self.scale:g}/sqrt({self.fan or 'width'}))"


def initialise_tables(module: nn.Module, init: TableInit) -> int:
    """Start every embedding table of ``module`` (not its auxiliary tables, e.g. importance weights) from
    ``init``, each from its own seed; the number of tables re-initialised. Tables must not be bound yet."""
    count = 0
    for table in module.modules():
        if isinstance(table, EmbeddingTable) and not table.auxiliary:
            table.reinitialise(init)
            count += 1
    return count


@dataclass(frozen=True, eq=False)
class Lookup:
    """Rows of one table that each of N IDs pools (sums), optionally weighted.

    ``indices`` is int64 [N] (one row per ID), [N, k] (k rows per ID), or, with ``lengths`` (int [N]), the
    rows of all IDs one after the other, ID i taking ``lengths[i]`` of them (zero: a zero vector). ``weights``
    (float, shaped like ``indices``) weight the rows; only a table created with ``weighted=True`` takes them.
    """

    table: EmbeddingTable
    indices: torch.Tensor
    lengths: torch.Tensor | None = None
    weights: torch.Tensor | None = None

    def bags(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(values [V], lengths [N], weights [V] or None): the jagged form every kernel takes."""
        indices, weights = self.indices, self.weights
        if self.lengths is not None:
            return indices, self.lengths, weights
        if indices.dim() == 1:
            return indices, torch.ones_like(indices), weights
        batch, width = indices.shape
        lengths = torch.full((batch,), width, dtype=indices.dtype, device=indices.device)
        return indices.reshape(-1), lengths, None if weights is None else weights.reshape(-1)

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0] if self.lengths is not None else self.indices.shape[0])


class EmbeddingTable(nn.Module):
    """A table of ``num_rows`` fp32 rows of ``dim``, initialised N(0, ``init_std``^2) from ``seed`` (or as
    ``init`` says, see :class:`TableInit`). An ``auxiliary`` table holds something other than embedding rows
    (e.g. importance weights): a suite's ``init`` setting leaves it alone.

    ``lookups`` is how many separate reads of the table one forward of its scheme module makes (a hash
    embedding reads its pool once per hash; most schemes read a table once). ``weighted`` tables take
    per-row weights.

    Standalone the table owns its ``weight``; once its model's :class:`embbench.collection.TableCollection`
    holds the rows (``bind``), ``weight`` is a view of them there, which the scheme may still read and write
    (e.g. to reset rows between epochs). Its state is exactly the weight.
    """

    def __init__(
        self,
        num_rows: int,
        dim: int,
        seed: int,
        init_std: float = DEFAULT_INIT_STD,
        weighted: bool = False,
        lookups: int = 1,
        init: TableInit | None = None,
        auxiliary: bool = False,
    ) -> None:
        super().__init__()
        if num_rows < 1:
            raise ValueError(f"a table needs at least one row, got {num_rows}")
        if dim < 1:
            raise ValueError(f"a table needs at least one column, got {dim}")
        if lookups < 1:
            raise ValueError(f"lookups must be >= 1 (reads of the table per forward), got {lookups}")
        self.num_rows, self.dim, self.weighted, self.lookups = int(num_rows), int(dim), weighted, int(lookups)
        self.seed, self.auxiliary = int(seed), auxiliary
        self.init = init if init is not None else TableInit("normal", init_std)
        self.register_parameter("weight", nn.Parameter(self.init.weights(self.num_rows, self.dim, self.seed)))
        self._collection: TableCollection | None = None
        self._key: str | None = None
        #: row-sparse gradients when read standalone (set by the model for tables outside its collection)
        self.sparse_gradients = False

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        if self._collection is not None:
            assert self._key is not None
            return self._collection.weight(self._key)
        return self._parameters["weight"]  # type: ignore[return-value]

    def reinitialise(self, init: TableInit) -> None:
        """Start the rows again from ``init`` (and this table's seed); only before a collection holds them."""
        if self._collection is not None:
            raise RuntimeError(f"table {self._key} is held by a collection: initialise it before building the model")
        self.init = init
        with torch.no_grad():
            self._parameters["weight"].copy_(init.weights(self.num_rows, self.dim, self.seed))

    @property
    def bound(self) -> bool:
        """Whether a collection holds this table's rows."""
        return self._collection is not None

    def bind(self, collection: TableCollection, key: str) -> None:
        """Hand the rows to ``collection`` (which has copied them) under ``key``; ``weight`` reads them there."""
        if self._collection is not None:
            raise RuntimeError(f"table {key} is already held by a collection")
        del self._parameters["weight"]
        # A plain attribute, not a submodule: the collection belongs to the model, not to this table.
        object.__setattr__(self, "_collection", collection)
        object.__setattr__(self, "_key", key)

    def lookup(
        self, indices: torch.Tensor, lengths: torch.Tensor | None = None, weights: torch.Tensor | None = None
    ) -> Lookup:
        """A read of this table (see :class:`Lookup`)."""
        if weights is not None and not self.weighted:
            raise ValueError("per-row weights need a table created with weighted=True")
        return Lookup(self, indices, lengths, weights)

    def pool(self, lookup: Lookup) -> torch.Tensor:
        """The pooled rows [N, dim] of one lookup, read from this table alone."""
        values, lengths, weights = lookup.bags()
        if self._collection is not None:
            return self._collection.pool_one(self, values, lengths, weights)
        offsets = torch.zeros(lengths.shape[0] + 1, dtype=torch.int64, device=values.device)
        torch.cumsum(lengths, 0, out=offsets[1:])
        return functional.embedding_bag(
            values, self.weight, offsets[:-1], mode="sum", per_sample_weights=weights, sparse=self.sparse_gradients
        )

    def forward(self, indices: torch.Tensor, per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [N, dim] of ``indices`` [N], or the (weighted) sums of the rows of ``indices`` [N, k]."""
        return self.pool(Lookup(self, indices, None, per_sample_weights))

    def extra_repr(self) -> str:
        held = f", held by the collection as {self._key}" if self._key else ""
        return f"num_rows={self.num_rows}, dim={self.dim}, lookups={self.lookups}{held}"


class TableBackedEmbedding(nn.Module):
    """Base class of scheme modules whose rows live in :class:`EmbeddingTable` modules.

    Subclasses create their tables in ``__init__`` and implement :meth:`lookups` and :meth:`combine`;
    ``forward(ids)`` = ``combine(ids, [pooled rows of each lookup])``. Every call of ``lookups`` must read the
    same tables in the same order, each table ``table.lookups`` times, for any batch.

    ``combine_is_linear`` (a class attribute, or set per instance) says that ``combine`` is linear in the pooled
    rows (sums, scalings, concatenations, projections; not a product of two reads) and reads of ``ids`` only
    their number and device: a bag of IDs (:mod:`embbench.bags`) then pools all its IDs' rows in the table
    kernel before one ``combine``. Otherwise each ID of a bag is embedded and the embeddings pooled.
    """

    combine_is_linear: bool = False

    @abstractmethod
    def lookups(self, ids: torch.Tensor) -> Sequence[Lookup]:
        """The table reads that embed int64 ``ids`` [N]."""

    @abstractmethod
    def combine(self, ids: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        """Embeddings [N, dim] from the pooled rows of each lookup ([N, table.dim] each, in lookup order)."""

    def embedding_tables(self) -> list[EmbeddingTable]:
        """The distinct tables of this module, in module order."""
        return [module for module in self.modules() if isinstance(module, EmbeddingTable)]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        collection = _collection_of(self)
        if collection is not None:
            return collection.embed_module(self, ids)
        return self.combine(ids, [lookup.table.pool(lookup) for lookup in self.lookups(ids)])


def _collection_of(module: TableBackedEmbedding) -> Any:
    for table in module.embedding_tables():
        return table._collection
    return None
