"""``dhe``: Deep Hash Embedding (Kang et al., KDD 2021) — no table; a parameter-free dense encoding of the
ID that a deep MLP (the decoder) turns into the embedding.

Encodings (the paper's Table 5 comparison): ``uniform`` (Algorithm 1, the default): k universal hashes
h_j(x) = ((a_j x + b_j) mod p) mod m, m = 10^6, mapped linearly onto [-1, 1]; ``gaussian``: the same hashes
through Box–Muller to N(0, 1); ``identity``: the ID itself as one feature; ``binary``: the ID's bits, one
feature each; ``random-fourier``: [cos 2π B v, sin 2π B v] of the ID v with Gaussian frequencies B (Tancik
et al., NeurIPS 2020). Decoder architectures (the paper's Table 7): ``equal`` widths (the default),
``pyramid`` (halving), ``inverted-pyramid`` (doubling), ``residual`` (equal widths with identity skips) and
``densenet`` (each layer reads all earlier hidden outputs). The width is solved from the budget.

Speed: the encoding is computed block by block from float64 hash values (see embbench.hashing) straight
into float32, never as an int64 [N, k] tensor; in eval mode BatchNorm is folded into the preceding Linear;
``cache_known_ids`` / :meth:`DHEModule.freeze` keep the embeddings of known IDs for inference.

With ``share = "all"`` one network embeds all of a cell's features (the paper's §6 future work), within the sum of
their budgets; the feature enters the encoding as a salt of the hashes (each feature its own k hash functions,
``share_indicator = "salted"``) or as a one-hot indicator appended to it (``"one-hot"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embbench import (
    FLOAT_BYTES,
    ID_BYTES,
    MERSENNE_PRIME,
    SHARE_MODES,
    Bags,
    BudgetTooSmall,
    FeatureSpec,
    HashFamily,
    Scheme,
    SchemePlan,
    largest_fitting,
    lookup_sorted,
)

ACTIVATIONS = {"mish": nn.Mish, "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}
ENCODINGS = ("uniform", "gaussian", "identity", "binary", "random-fourier")
HASHED_ENCODINGS = ("uniform", "gaussian")
#: encodings whose random parts are regenerated from one stored int64 seed (8 bytes of state)
SEEDED_ENCODINGS = ("uniform", "gaussian", "random-fourier")
ARCHITECTURES = ("equal", "pyramid", "inverted-pyramid", "residual", "densenet")
#: how a bag of IDs is embedded: the pool of their embeddings, or the decoder of the pool of their encodings
BAG_POOLINGS = ("embedding", "encoding")
#: how a network shared by several features tells them apart (see DeepHashEmbedding.plan_shared)
SHARE_INDICATORS = ("salted", "one-hot")
#: feature i of a shared network hashes with the seed seed + SALT_STRIDE * i
SALT_STRIDE = 7919
MAX_WIDTH = 1 << 16
#: IDs embedded at once when filling the inference cache, to bound memory (IDs x k floats)
CACHE_CHUNK_IDS = 1 << 14


def id_range(ids: np.ndarray) -> tuple[int, int]:
    """(largest training ID mod p, at least 1; its bit length): the scale of the identity and random-Fourier
    encodings and the bit count of the binary encoding, fixed at plan time from the training split."""
    largest = int((np.asarray(ids, dtype=np.int64) % MERSENNE_PRIME).max()) if len(ids) else 1
    largest = max(largest, 1)
    return largest, largest.bit_length()


def hidden_widths(architecture: str, width: int, hidden_layers: int) -> list[int]:
    """Widths of the hidden layers; ``width`` is the widest (first of a pyramid, last of an inverted one)."""
    if architecture == "pyramid":
        return [max(1, width >> layer) for layer in range(hidden_layers)]
    if architecture == "inverted-pyramid":
        return [max(1, width >> layer) for layer in reversed(range(hidden_layers))]
    return [width] * hidden_layers


def layer_shapes(
    architecture: str, encoding_dim: int, width: int, hidden_layers: int, dim: int
) -> list[tuple[int, int]]:
    """(fan_in, fan_out) of every Linear of the decoder, the output layer last."""
    widths = hidden_widths(architecture, width, hidden_layers)
    shapes, fan_in = [], encoding_dim
    for layer, fan_out in enumerate(widths):
        shapes.append((fan_in, fan_out))
        # A DenseNet-like layer reads the concatenation of every hidden output before it.
        fan_in = sum(widths[: layer + 1]) if architecture == "densenet" else fan_out
    shapes.append((fan_in, dim))
    return shapes


def decoder_size_bytes(shapes: list[tuple[int, int]], batch_norm: bool) -> int:
    """Linear weights and biases, and per hidden unit a BatchNorm's weight, bias, running mean and variance
    (4 floats) plus one int64 batch counter per BatchNorm. Skip connections hold no state."""
    linear = sum(fan_in * fan_out + fan_out for fan_in, fan_out in shapes) * FLOAT_BYTES
    norms = sum(4 * fan_out * FLOAT_BYTES + ID_BYTES for _, fan_out in shapes[:-1]) if batch_norm else 0
    return linear + norms


class DHEEncoder(nn.Module):
    """IDs -> the dense encoding, float32 [N, encoding_dim]; no parameters (at most a stored seed)."""

    def __init__(
        self, encoding: str, num_hashes: int, num_buckets: int, id_scale: int, id_bits: int,
        fourier_scale: float, seed: int,
    ) -> None:
        super().__init__()
        self.encoding, self.id_scale, self.id_bits = encoding, id_scale, id_bits
        if encoding in HASHED_ENCODINGS:
            # premix=False: the paper's Algorithm 1 as written (see embbench.hashing on pre-mixing).
            self.hash = HashFamily(num_hashes, num_buckets, seed=seed, premix=False)
            self.dim = num_hashes
        elif encoding == "random-fourier":
            self.register_buffer("fourier_seed", torch.tensor(int(seed), dtype=torch.int64))
            self.register_buffer("frequencies", torch.empty(num_hashes // 2, dtype=torch.float64), persistent=False)
            self.fourier_scale = fourier_scale
            self._regenerate()
            self.dim = num_hashes
        else:
            self.dim = 1 if encoding == "identity" else id_bits
        if encoding == "binary":
            self.register_buffer("bit_positions", torch.arange(id_bits, dtype=torch.int64), persistent=False)

    def _regenerate(self) -> None:
        generator = torch.Generator().manual_seed(int(self.fourier_seed))
        frequencies = torch.randn(self.frequencies.numel(), generator=generator, dtype=torch.float64)
        self.frequencies.copy_(frequencies * self.fourier_scale)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.encoding == "random-fourier":
            self._regenerate()

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        """What the encoding is a function of: the k hash values, or the ID mod p (its low bits for binary)."""
        if self.encoding in HASHED_ENCODINGS:
            return self.hash(ids)
        reduced = torch.remainder(ids, MERSENNE_PRIME)
        if self.encoding == "binary":
            reduced = reduced & ((1 << self.id_bits) - 1)
        return reduced.unsqueeze(1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.encoding == "uniform":
            return self._uniform(ids)
        if self.encoding == "gaussian":
            return self._gaussian(ids)
        reduced = torch.remainder(ids, MERSENNE_PRIME)
        if self.encoding == "binary":
            bits = (reduced.unsqueeze(1) >> self.bit_positions) & 1
            return bits.to(torch.float32) * 2.0 - 1.0
        position = reduced.to(torch.float64) / self.id_scale  # training IDs in [0, 1]
        if self.encoding == "identity":
            return (position * 2.0 - 1.0).to(torch.float32).unsqueeze(1)
        angles = (2.0 * math.pi) * position.unsqueeze(1) * self.frequencies  # in float64: v is fine-grained
        return torch.cat((torch.cos(angles), torch.sin(angles)), dim=1).to(torch.float32)

    def _uniform(self, ids: torch.Tensor) -> torch.Tensor:
        # Algorithm 1's transform, bucket * 2 / (m - 1) - 1, per cache-sized block of hash values.
        scale = 2.0 / max(self.hash.num_buckets - 1, 1)
        code = torch.empty(ids.numel(), self.dim, dtype=torch.float32, device=ids.device)
        for rows, values in self.hash.hash_blocks(ids):
            code[rows].copy_(values).mul_(scale).sub_(1.0)
        return code

    def _gaussian(self, ids: torch.Tensor) -> torch.Tensor:
        # Box–Muller on pairs of hash values mapped into (0, 1].
        buckets = torch.empty(ids.numel(), self.dim, dtype=torch.float32, device=ids.device)
        for rows, values in self.hash.hash_blocks(ids):
            buckets[rows].copy_(values)
        scale = max(self.hash.num_buckets - 1, 1)
        unit = (buckets + 1.0) / (scale + 1.0)
        first, second = unit[:, 0::2], unit[:, 1::2]
        radius = torch.sqrt(-2.0 * torch.log(first))
        angle = 2.0 * math.pi * second
        return torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=2).flatten(1)


class DHEDecoder(nn.Module):
    """The embedding network: hidden layers Linear -> [BatchNorm] -> activation, then Linear to ``dim``.

    ``residual`` adds each hidden layer's input to its output (from the second layer on, where the shapes
    agree); ``densenet`` feeds each layer the concatenation of all earlier hidden outputs. In eval mode
    each BatchNorm is folded into the Linear before it (same outputs up to float rounding, fewer passes).
    """

    def __init__(
        self, shapes: list[tuple[int, int]], architecture: str, activation: str, batch_norm: bool
    ) -> None:
        super().__init__()
        self.architecture, self.batch_norm = architecture, batch_norm
        self.hidden = nn.ModuleList(nn.Linear(fan_in, fan_out) for fan_in, fan_out in shapes[:-1])
        self.norms = nn.ModuleList(nn.BatchNorm1d(fan_out) for _, fan_out in shapes[:-1]) if batch_norm else None
        self.activation = ACTIVATIONS[activation]()
        self.output = nn.Linear(*shapes[-1])

    def _affine(self, layer: int, inputs: torch.Tensor) -> torch.Tensor:
        linear = self.hidden[layer]
        if self.norms is None:
            return linear(inputs)
        norm = self.norms[layer]
        if self.training or norm.running_mean is None:
            return norm(linear(inputs))
        # BN(W x + b) = s (W x + b - mean) + beta with s = gamma / sqrt(var + eps): one Linear.
        scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
        weight = linear.weight * scale.unsqueeze(1)
        bias = (linear.bias - norm.running_mean) * scale + norm.bias
        return F.linear(inputs, weight, bias)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        inputs, outputs = code, []
        for layer in range(len(self.hidden)):
            hidden = self.activation(self._affine(layer, inputs))
            if self.architecture == "residual" and layer > 0:
                hidden = hidden + inputs
            if self.architecture == "densenet":
                outputs.append(hidden)
                inputs = torch.cat(outputs, dim=1) if len(outputs) > 1 else hidden
            else:
                inputs = hidden
        return self.output(inputs)


class SideFeatureLookup(nn.Module):
    """Raw IDs -> their side features (e.g. genres), zeros for an ID without any (the DHE paper's Table 9).

    Side features are input data that arrive with the ID, not learned state: they live in non-persistent
    buffers and are not part of the scheme's size.
    """

    def __init__(self, ids: np.ndarray, side: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("ids", torch.as_tensor(ids, dtype=torch.int64), persistent=False)
        values = torch.as_tensor(np.asarray(side, dtype=np.float32))
        self.register_buffer("values", torch.cat((values, values.new_zeros(1, values.shape[1]))), persistent=False)

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        position, known = lookup_sorted(self.ids, ids)
        return self.values[torch.where(known, position, torch.full_like(position, self.ids.numel()))]


class DHEModule(nn.Module):
    """encoder -> decoder, with an optional inference cache of the embeddings of known IDs.

    The cache (``freeze(ids)``, or automatic for the training IDs with ``cache_known_ids``) is a derived
    artefact: non-persistent buffers, outside state_dict and the size; used only in eval mode without
    autograd (cached rows carry no gradient); dropped whenever the module trains or loads a state.

    ``feature_code`` (float32 [F], one-hot) is appended to every ID's encoding when one encoder and decoder are
    shared by F features, each through its own DHEModule: like the side features, input data, not state.

    ``bag_pooling`` says how :meth:`embed_bags` pools a bag feature (:mod:`embbench.bags`): ``embedding`` (pool
    the IDs' embeddings, as every scheme does) or ``encoding`` (decode the pooled encodings).
    """

    def __init__(
        self,
        encoder: DHEEncoder,
        decoder: DHEDecoder,
        known_ids: torch.Tensor | None = None,
        compile: bool = False,
        side: SideFeatureLookup | None = None,
        feature_code: torch.Tensor | None = None,
        bag_pooling: str = "embedding",
    ) -> None:
        super().__init__()
        self.encoder, self.decoder, self.side = encoder, decoder, side
        self.bag_pooling = bag_pooling
        self.register_buffer("known_ids", known_ids, persistent=False)  # None unless cache_known_ids
        self.register_buffer("feature_code", feature_code, persistent=False)  # None unless shared
        self.register_buffer("cached_ids", torch.empty(0, dtype=torch.int64), persistent=False)
        self.register_buffer("cached_embeddings", torch.empty(0, 0), persistent=False)
        self.compile = compile
        self._compiled: Any = None  # built on first use: compiling costs seconds and a C++ toolchain

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        """IDs with equal tuples (hash values, or the ID mod p, and side features) get equal embeddings."""
        tuples = self.encoder.index_tuples(ids)
        if self.side is None:
            return tuples
        side_bits = self.side(ids).contiguous().view(torch.int32).to(torch.int64)  # exact: the float's bits
        return torch.cat((tuples, side_bits), dim=1)

    def _compute(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder(self._encode(ids))

    def _encode(self, ids: torch.Tensor) -> torch.Tensor:
        """The decoder's input for each ID: its encoding, and its side features or feature indicator."""
        code = self.encoder(ids)
        if self.side is not None:  # the side-feature enhanced encoding: [hash encoding; side features]
            code = torch.cat((code, self.side(ids)), dim=1)
        if self.feature_code is not None:  # a shared network: [hash encoding; one-hot feature indicator]
            code = torch.cat((code, self.feature_code.expand(code.shape[0], -1)), dim=1)
        return code

    def embed_bags(self, bags: Bags) -> torch.Tensor:
        """Each bag's embedding [B, dim]: with ``bag_pooling`` "embedding" the pool of its IDs' embeddings; with
        "encoding" the decoder of the pool of their encodings (one decoder pass per bag). Empty bags: zeros."""
        if self.bag_pooling == "embedding":
            return bags.pool(self(bags.values))
        embedded = self.decoder(bags.pool(self._encode(bags.values)))
        return embedded * (bags.lengths > 0).unsqueeze(1).to(embedded.dtype)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.compile:
            return self._compute(ids)
        if self._compiled is None:
            self._compiled = torch.compile(self._compute, dynamic=True)
        return self._compiled(ids)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.training or torch.is_grad_enabled():
            return self._embed(ids)
        if self.known_ids is not None and self.cached_ids.numel() == 0:
            self.freeze(self.known_ids)
        if self.cached_ids.numel() == 0:
            return self._embed(ids)
        position, known = lookup_sorted(self.cached_ids, ids)
        if bool(known.all()):
            return self.cached_embeddings[position]
        out = torch.empty(ids.numel(), self.cached_embeddings.shape[1], dtype=self.cached_embeddings.dtype)
        out[known] = self.cached_embeddings[position[known]]
        unseen = ~known
        out[unseen] = self._embed(ids[unseen])
        return out

    @torch.no_grad()
    def freeze(self, ids: torch.Tensor) -> DHEModule:
        """Switch to eval mode and cache the embeddings of ``ids`` for inference; other IDs are still
        computed on the fly. The cache is dropped by ``train()``."""
        self.eval()
        ids = torch.unique(ids.to(torch.int64))
        embeddings = torch.cat([self._embed(chunk) for chunk in ids.split(CACHE_CHUNK_IDS)]) if ids.numel() else None
        self.cached_ids = ids
        self.cached_embeddings = embeddings if embeddings is not None else torch.empty(0, 0)
        return self

    def clear_cache(self) -> None:
        self.cached_ids = torch.empty(0, dtype=torch.int64)
        self.cached_embeddings = torch.empty(0, 0)

    def train(self, mode: bool = True) -> DHEModule:
        if mode:
            self.clear_cache()  # the decoder is about to change
        return super().train(mode)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.clear_cache()
        super()._load_from_state_dict(*args, **kwargs)


class DeepHashEmbedding(Scheme):
    """Deep Hash Embedding: dense ID encoding -> MLP decoder; the width is solved from the budget."""

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
        architecture: str = "equal",
        fourier_scale: float = 10.0,
        cache_known_ids: bool = False,
        compile: bool = False,
        side_features: bool = False,
        share: str = "none",
        bag_pooling: str = "embedding",
        share_indicator: str = "salted",
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
        if encoding in ("gaussian", "random-fourier") and num_hashes % 2:
            raise ValueError(
                f"num_hashes must be even for the {encoding} encoding (cos/sin or Box–Muller pairs), got {num_hashes}"
            )
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got '{architecture}'")
        if not (isinstance(fourier_scale, int | float) and 0 < fourier_scale < math.inf):
            raise ValueError(f"fourier_scale must be a positive finite number, got {fourier_scale}")
        if bag_pooling not in BAG_POOLINGS:
            raise ValueError(f"bag_pooling must be one of {', '.join(BAG_POOLINGS)}, got '{bag_pooling}'")
        if share not in SHARE_MODES:
            raise ValueError(f"share must be one of {', '.join(SHARE_MODES)}, got '{share}'")
        if share != "none" and side_features:
            raise ValueError(
                "share 'all' takes no side_features (features with and without them would need encodings of "
                "different widths); set side_features = false or share = 'none'"
            )
        if share_indicator not in SHARE_INDICATORS:
            raise ValueError(f"share_indicator must be one of {', '.join(SHARE_INDICATORS)}, got '{share_indicator}'")
        if share == "none" and share_indicator != SHARE_INDICATORS[0]:
            raise ValueError(
                f"share_indicator '{share_indicator}' needs share = 'all' (it tells the shared features apart)"
            )
        if share != "none" and share_indicator == "salted" and encoding not in SEEDED_ENCODINGS:
            raise ValueError(
                f"share_indicator 'salted' draws each feature's encoding from its own seed, and the {encoding} "
                "encoding has none; use share_indicator = 'one-hot'"
            )
        self.num_hashes, self.num_buckets, self.hidden_layers = num_hashes, num_buckets, hidden_layers
        self.width, self.activation, self.batch_norm, self.encoding = width, activation, batch_norm, encoding
        self.architecture, self.fourier_scale = architecture, float(fourier_scale)
        self.cache_known_ids, self.compile = bool(cache_known_ids), bool(compile)
        self.side_features, self.share = bool(side_features), share
        self.share_indicator = share_indicator
        self.bag_pooling = bag_pooling

    @property
    def shares_features(self) -> bool:
        return self.share == "all"

    def encoding_dim(self, id_bits: int = 1) -> int:
        """Features of the encoding: k, except 1 for identity and the training IDs' bit count for binary."""
        return {"identity": 1, "binary": id_bits}.get(self.encoding, self.num_hashes)

    def size_bytes(self, width: int, dim: int, encoding_dim: int | None = None) -> int:
        """The decoder's state, plus the 8-byte seed of a hashed or random-Fourier encoding."""
        shapes = layer_shapes(
            self.architecture, encoding_dim or self.encoding_dim(), width, self.hidden_layers, dim
        )
        seed_bytes = ID_BYTES if self.encoding in SEEDED_ENCODINGS else 0
        return decoder_size_bytes(shapes, self.batch_norm) + seed_bytes

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        # With side_features, a feature that has them (items with genres) appends them to the encoding.
        side_dim = feature.side.shape[1] if self.side_features and feature.side is not None else 0
        return self._plan(feature.ids, feature.dim, budget_bytes, side_dim, ())

    def plan_shared(self, features: Sequence[FeatureSpec], budget_bytes: int) -> SchemePlan:
        """One network for all ``features``, its width solved from the sum of their budgets. The encoding of an ID
        of feature i: with ``share_indicator`` "salted", its hash encoding under feature i's own k hash functions
        (an 8-byte seed more per feature); with "one-hot", its hash encoding followed by the one-hot indicator
        of i (F more inputs to the first layer).

        Why salted by default: each feature's module is called on its own batch, so in training BatchNorm
        subtracts the batch mean of the first layer, in which a one-hot indicator is a constant: it cancels, and
        the same raw ID of two features embeds alike; in evaluation the running statistics, averaged over both
        features, leave part of it: training and evaluation disagree. Salted hashes give the features different
        codes from one distribution, which BatchNorm leaves as they are."""
        dims = {feature.dim for feature in features}
        if len(dims) != 1:
            raise ValueError(f"share 'all' needs features of one embedding dim, got dims {sorted(dims)}")
        ids = np.concatenate([np.asarray(feature.ids, dtype=np.int64) for feature in features])
        names = tuple(feature.name for feature in features)
        return self._plan(ids, dims.pop(), budget_bytes, 0, names)

    def _plan(
        self, ids: np.ndarray, dim: int, budget_bytes: int, side_dim: int, shared_by: tuple[str, ...]
    ) -> SchemePlan:
        """The width for ``budget_bytes``, the encoding of ``ids`` widened by ``side_dim`` side features; for a
        network shared by the features ``shared_by``, their indicator (a one-hot input each, or a hash seed each)."""
        id_scale, id_bits = id_range(ids)
        one_hot = len(shared_by) if self.share_indicator == "one-hot" else 0
        salts = len(shared_by) - 1 if shared_by and self.share_indicator == "salted" else 0
        encoding_dim = self.encoding_dim(id_bits) + side_dim + one_hot

        def size_of(width: int) -> int:
            return self.size_bytes(width, dim, encoding_dim) + salts * ID_BYTES  # the other features' seeds

        if self.width is not None:
            width = self.width if size_of(self.width) <= budget_bytes else None
            lowest = self.width
        else:
            width = largest_fitting(size_of, 1, MAX_WIDTH, budget_bytes)
            lowest = 1
        if width is None:
            raise BudgetTooSmall(
                self.name, budget_bytes, size_of(lowest),
                f"{self.encoding} encoding of {encoding_dim} features, width {lowest}",
            )
        params = dict(
            self.get_params(),
            # the normalised values: a float scale, true or false flags, whatever the suite file wrote
            fourier_scale=self.fourier_scale,
            cache_known_ids=self.cache_known_ids,
            compile=self.compile,
            side_features=self.side_features,
            width=width,
            id_scale=id_scale,
            id_bits=id_bits,
            side_dim=side_dim,
        )
        notes = {"hidden_widths": hidden_widths(self.architecture, width, self.hidden_layers)}
        return SchemePlan(self.name, params, size_of(width), budget_bytes, notes, shared_by=shared_by)

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        p = plan.params
        encoder = self._encoder(p, feature.ids, seed)
        side = None
        if p.get("side_dim"):
            if feature.side is None or feature.side.shape[1] != p["side_dim"]:
                raise ValueError(f"the plan expects {p['side_dim']} side features; the feature has none or others")
            side = SideFeatureLookup(feature.ids, feature.side)
        torch.manual_seed(seed + 1)  # the decoder's initial weights, reproducibly
        shapes = layer_shapes(
            p.get("architecture", "equal"), encoder.dim + (side.dim if side else 0), p["width"],
            p["hidden_layers"], feature.dim,
        )
        decoder = DHEDecoder(shapes, p.get("architecture", "equal"), p["activation"], p["batch_norm"])
        known_ids = torch.as_tensor(feature.ids, dtype=torch.int64) if p.get("cache_known_ids") else None
        return DHEModule(
            encoder, decoder, known_ids, compile=bool(p.get("compile", False)), side=side,
            bag_pooling=p.get("bag_pooling", "embedding"),
        )

    def build_shared(self, features: Sequence[FeatureSpec], plan: SchemePlan, seed: int) -> dict[str, nn.Module]:
        """A DHEModule per feature over one decoder: feature i's hashes with seed + SALT_STRIDE * i ("salted"), or
        all share one encoder and feature i's appends the one-hot of i ("one-hot")."""
        names = tuple(feature.name for feature in features)
        if names != plan.shared_by:
            raise ValueError(f"the plan is shared by features {plan.shared_by}, not {names}")
        p = plan.params
        ids = np.concatenate([np.asarray(feature.ids, dtype=np.int64) for feature in features])
        salted = p["share_indicator"] == "salted"
        shared_encoder = self._encoder(p, ids, seed)
        encoders = [
            self._encoder(p, ids, seed + SALT_STRIDE * index) if salted and index else shared_encoder
            for index in range(len(features))
        ]
        one_hot = 0 if salted else len(features)
        torch.manual_seed(seed + 1)  # the decoder's initial weights, reproducibly
        shapes = layer_shapes(
            p["architecture"], shared_encoder.dim + one_hot, p["width"], p["hidden_layers"], features[0].dim
        )
        decoder = DHEDecoder(shapes, p["architecture"], p["activation"], p["batch_norm"])
        indicators = torch.eye(len(features), dtype=torch.float32)
        return {
            feature.name: DHEModule(
                encoders[index], decoder,
                torch.as_tensor(feature.ids, dtype=torch.int64) if p["cache_known_ids"] else None,
                compile=p["compile"], feature_code=None if salted else indicators[index].clone(),
                bag_pooling=p.get("bag_pooling", "embedding"),
            )
            for index, feature in enumerate(features)
        }

    @staticmethod
    def _encoder(p: dict[str, Any], ids: np.ndarray, seed: int) -> DHEEncoder:
        id_scale, id_bits = p.get("id_scale"), p.get("id_bits")
        if id_scale is None or id_bits is None:
            id_scale, id_bits = id_range(ids)
        return DHEEncoder(
            p["encoding"], p["num_hashes"], p["num_buckets"], id_scale, id_bits, p.get("fourier_scale", 10.0), seed
        )
