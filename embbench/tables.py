"""Embedding tables for table-backed schemes: torchrec's EmbeddingBagCollection where it imports, plain
``torch.nn.EmbeddingBag`` otherwise, with identical initial weights and identical outputs.

Keeping rows in torchrec tables lets later layers shard (DistributedModelParallel) and quantise them.
``EMBBENCH_TABLE_BACKEND`` = ``auto`` (default), ``torchrec`` or ``torch`` forces a backend.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import nn

DEFAULT_INIT_STD = 0.01


@functools.cache
def torchrec_available() -> bool:
    # torch.fx logs a deprecation warning when torchrec imports; it is not the user's concern.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    try:
        import torchrec  # noqa: F401
    except Exception:  # ImportError, or fbgemm failing to load its library
        return False
    return True


def table_backend() -> str:
    """The backend new tables use: 'torchrec' or 'torch'."""
    wanted = os.environ.get("EMBBENCH_TABLE_BACKEND", "auto").strip().lower()
    if wanted not in ("auto", "torchrec", "torch"):
        raise ValueError(f"EMBBENCH_TABLE_BACKEND must be auto, torchrec or torch, got '{wanted}'")
    if wanted == "torch":
        return "torch"
    if torchrec_available():
        return "torchrec"
    if wanted == "torchrec":
        raise RuntimeError("EMBBENCH_TABLE_BACKEND=torchrec but torchrec cannot be imported; see README")
    return "torch"


def initial_weights(num_rows: int, dim: int, seed: int, std: float = DEFAULT_INIT_STD) -> torch.Tensor:
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(num_rows, dim, generator=generator) * std


class EmbeddingTable(nn.Module):
    """A table of ``num_rows`` fp32 rows of ``dim``.

    forward(indices) takes int64 row indices [N] (one row each) or [N, k] (k rows summed, optionally
    weighted by ``per_sample_weights`` [N, k]) and returns [N, dim]. Its state is exactly the weight.
    """

    def __init__(
        self, num_rows: int, dim: int, seed: int, init_std: float = DEFAULT_INIT_STD, weighted: bool = False
    ) -> None:
        super().__init__()
        if num_rows < 1:
            raise ValueError(f"a table needs at least one row, got {num_rows}")
        self.num_rows, self.dim, self.weighted = num_rows, dim, weighted
        self.backend = table_backend()
        weights = initial_weights(num_rows, dim, seed, init_std)
        if self.backend == "torchrec":
            from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

            config = EmbeddingBagConfig(
                name="table", embedding_dim=dim, num_embeddings=num_rows, feature_names=["ids"]
            )
            self.ebc = EmbeddingBagCollection(tables=[config], is_weighted=weighted, device=torch.device("cpu"))
            with torch.no_grad():
                self.ebc.embedding_bags["table"].weight.copy_(weights)
        else:
            self.bag = nn.EmbeddingBag(num_rows, dim, mode="sum", _weight=weights)

    @property
    def weight(self) -> torch.Tensor:
        if self.backend == "torchrec":
            return self.ebc.embedding_bags["table"].weight
        return self.bag.weight

    def forward(self, indices: torch.Tensor, per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        if indices.dim() == 1:
            indices = indices.unsqueeze(1)
            if per_sample_weights is not None:
                per_sample_weights = per_sample_weights.unsqueeze(1)
        if self.backend == "torch":
            return self.bag(indices, per_sample_weights=per_sample_weights)
        from torchrec import KeyedJaggedTensor

        batch, width = indices.shape
        lengths = torch.full((batch,), width, dtype=torch.int64, device=indices.device)
        kjt = KeyedJaggedTensor(
            keys=["ids"],
            values=indices.reshape(-1),
            lengths=lengths,
            weights=None if per_sample_weights is None else per_sample_weights.reshape(-1),
        )
        return self.ebc(kjt)["ids"]

    def extra_repr(self) -> str:
        return f"num_rows={self.num_rows}, dim={self.dim}, backend={self.backend}"
