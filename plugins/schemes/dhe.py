"""``dhe``: Deep Hash Embedding (Kang et al., KDD 2021) — no table; k universal hashes give a dense code
that a deep MLP turns into the embedding.

Encoding: h_j(x) = ((a_j x + b_j) mod p) mod m for j = 1..k (m = 10^6), mapped to U(-1, 1) ("uniform", the
paper's default) or through Box–Muller to N(0, 1) ("gaussian"). Decoder: h hidden layers of equal width,
each Linear -> BatchNorm -> Mish, then Linear to the embedding dim. The width is solved from the budget.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from embbench import (
    ID_BYTES,
    BudgetTooSmall,
    FeatureSpec,
    HashFamily,
    Scheme,
    SchemePlan,
    largest_fitting,
    mlp_size_bytes,
)

ACTIVATIONS = {"mish": nn.Mish, "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}
ENCODINGS = ("uniform", "gaussian")
MAX_WIDTH = 1 << 16


class DHEEncoder(nn.Module):
    """IDs -> dense hash encoding [N, k], values in [-1, 1] (uniform) or standard normal (gaussian)."""

    def __init__(self, num_hashes: int, num_buckets: int, encoding: str, seed: int) -> None:
        super().__init__()
        self.hash = HashFamily(num_hashes, num_buckets, seed=seed)
        self.encoding = encoding

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        buckets = self.hash(ids).to(torch.float32)
        scale = max(self.hash.num_buckets - 1, 1)
        if self.encoding == "uniform":
            return buckets * (2.0 / scale) - 1.0
        # Box–Muller on pairs of hash values mapped into (0, 1].
        unit = (buckets + 1.0) / (scale + 1.0)
        first, second = unit[:, 0::2], unit[:, 1::2]
        radius = torch.sqrt(-2.0 * torch.log(first))
        angle = 2.0 * math.pi * second
        return torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=2).flatten(1)


class DHEModule(nn.Module):
    def __init__(
        self,
        num_hashes: int,
        num_buckets: int,
        encoding: str,
        width: int,
        hidden_layers: int,
        dim: int,
        activation: str,
        batch_norm: bool,
        seed: int,
    ) -> None:
        super().__init__()
        self.encoder = DHEEncoder(num_hashes, num_buckets, encoding, seed)
        torch.manual_seed(seed + 1)  # the decoder's initial weights, reproducibly
        layers: list[nn.Module] = []
        fan_in = num_hashes
        for _ in range(hidden_layers):
            layers.append(nn.Linear(fan_in, width))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(ACTIVATIONS[activation]())
            fan_in = width
        layers.append(nn.Linear(fan_in, dim))
        self.decoder = nn.Sequential(*layers)

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        """The k hash values: IDs with equal values get equal encodings, hence equal embeddings."""
        return self.encoder.hash(ids)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(ids))


class DeepHashEmbedding(Scheme):
    """Deep Hash Embedding: k hashes -> dense encoding -> equal-width MLP (BatchNorm, Mish); width from budget."""

    summary = "Deep Hash Embedding (Kang et al. 2021): k hashes -> dense code -> MLP; no table"
    unseen = "generated"

    def __init__(
        self,
        num_hashes: int = 1024,
        num_buckets: int = 1_000_000,
        hidden_layers: int = 5,
        width: int | None = None,
        activation: str = "mish",
        batch_norm: bool = True,
        encoding: str = "uniform",
    ) -> None:
        if not 1 <= num_hashes <= 65536:
            raise ValueError(f"num_hashes must be in [1, 65536], got {num_hashes}")
        if not 2 <= num_buckets <= 2**31 - 1:
            raise ValueError(f"num_buckets must be in [2, 2147483647], got {num_buckets}")
        if not 1 <= hidden_layers <= 64:
            raise ValueError(f"hidden_layers must be in [1, 64], got {hidden_layers}")
        if width is not None and not 1 <= width <= MAX_WIDTH:
            raise ValueError(f"width must be in [1, {MAX_WIDTH}] or unset (solved from the budget), got {width}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got '{activation}'")
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got '{encoding}'")
        if encoding == "gaussian" and num_hashes % 2:
            raise ValueError(f"num_hashes must be even for the gaussian encoding (Box–Muller pairs), got {num_hashes}")
        self.num_hashes, self.num_buckets, self.hidden_layers = num_hashes, num_buckets, hidden_layers
        self.width, self.activation, self.batch_norm, self.encoding = width, activation, batch_norm, encoding
        self._params = {
            "num_hashes": num_hashes, "num_buckets": num_buckets, "hidden_layers": hidden_layers,
            "width": width, "activation": activation, "batch_norm": batch_norm, "encoding": encoding,
        }

    def size_bytes(self, width: int, dim: int) -> int:
        widths = [self.num_hashes] + [width] * self.hidden_layers + [dim]
        return mlp_size_bytes(widths, self.batch_norm) + ID_BYTES  # the decoder and the hash seed

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        def size_of(width: int) -> int:
            return self.size_bytes(width, feature.dim)

        if self.width is not None:
            width = self.width if size_of(self.width) <= budget_bytes else None
            lowest = self.width
        else:
            width = largest_fitting(size_of, 1, MAX_WIDTH, budget_bytes)
            lowest = 1
        if width is None:
            raise BudgetTooSmall(
                "dhe", budget_bytes, size_of(lowest), f"k={self.num_hashes} hashes, width {lowest}"
            )
        params = dict(self._params, width=width)
        return SchemePlan("dhe", params, size_of(width), budget_bytes)

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        p = plan.params
        return DHEModule(
            p["num_hashes"], p["num_buckets"], p["encoding"], p["width"], p["hidden_layers"],
            feature.dim, p["activation"], p["batch_norm"], seed,
        )
