"""The model APIs. A user-item model (:class:`RecModel`) embeds a user and an item feature and scores their
interaction; a click-through model (:class:`CTRModel`) embeds one feature per categorical field plus dense
features.

Model plugins subclass one of them; the task says which (ranking and rating classification take a
``RecModel``, ``ctr`` a ``CTRModel``). The core builds each feature's embedding module from a scheme and hands
the model a :class:`embbench.collection.FeatureEmbeddings`, which looks up every feature of a batch at once;
the model never knows which scheme produced them. ``RecModel.interact_all`` scores every item of the catalogue
for a batch of users, which full-ranking evaluation needs; subclasses override it with a faster exact form
where one exists.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from embbench.collection import FeatureEmbeddings

#: constructor arguments supplied by the core, not by suite files
RESERVED_ARGUMENTS = ("embeddings", "dim", "num_dense")


def _feature_embeddings(embeddings: Mapping[str, nn.Module]) -> FeatureEmbeddings:
    return embeddings if isinstance(embeddings, FeatureEmbeddings) else FeatureEmbeddings(embeddings)


def _dense_size_bytes(model: nn.Module, embeddings: nn.Module) -> int:
    embedding_params = {id(p) for p in embeddings.parameters()}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in embedding_params)


class RecModel(nn.Module, ABC):
    """Base class of user-item model plugins: forward(user IDs [B], item IDs [B]) -> logits [B].

    ``embeddings`` has the features ``user`` and ``item`` (a :class:`FeatureEmbeddings`, or a mapping of
    modules, which is wrapped in one); both are looked up in one call per batch. Where ``embeddings`` has bag
    features (:mod:`embbench.bags`), a user's or an item's vector is its own embedding plus the pooled embedding
    of each of its bags (their sum): ``user_vectors`` and ``item_vectors``, which ``interact`` scores.
    """

    summary: ClassVar[str] = ""

    def __init__(self, embeddings: Mapping[str, nn.Module], dim: int) -> None:
        super().__init__()
        self.embeddings = _feature_embeddings(embeddings)
        missing = {"user", "item"} - set(self.embeddings.names())
        if missing:
            raise ValueError(f"a user-item model needs 'user' and 'item' embeddings, missing {sorted(missing)}")
        self.dim = dim

    @property
    def user_embedding(self) -> nn.Module:
        """The user feature's embedding module (IDs [N] -> [N, dim])."""
        return self.embeddings["user"]

    @property
    def item_embedding(self) -> nn.Module:
        """The item feature's embedding module (IDs [N] -> [N, dim])."""
        return self.embeddings["item"]

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        vectors = self.embeddings({"user": users, "item": items})
        return self.interact(self._with_bags(vectors, "user"), self._with_bags(vectors, "item"))

    def user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        """The vectors [N, dim] ``interact`` scores for ``users``: their embeddings plus their bags'."""
        return self._with_bags(self.embeddings({"user": users}), "user")

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """The vectors [N, dim] ``interact`` scores for ``items``: their embeddings plus their bags'."""
        return self._with_bags(self.embeddings({"item": items}), "item")

    def _with_bags(self, vectors: Mapping[str, torch.Tensor], owner: str) -> torch.Tensor:
        total = vectors[owner]
        for bag in self.embeddings.bags_of(owner):
            total = total + vectors[bag]
        return total

    @abstractmethod
    def interact(self, user_vectors: torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
        """Logits [B] for paired user and item embeddings [B, dim]."""

    def interact_all(self, user_vectors: torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
        """Logits [B, M] for every user of [B, dim] against every item of [M, dim]."""
        batch, num_items = user_vectors.shape[0], item_vectors.shape[0]
        users = user_vectors.unsqueeze(1).expand(batch, num_items, -1).reshape(batch * num_items, -1)
        items = item_vectors.unsqueeze(0).expand(batch, num_items, -1).reshape(batch * num_items, -1)
        return self.interact(users, items).reshape(batch, num_items)

    def embedding_modules(self) -> dict[str, nn.Module]:
        """The embedding module of each feature, by feature name."""
        return dict(self.embeddings.features.items())

    def dense_size_bytes(self) -> int:
        """Bytes of the model's own parameters, outside the embeddings."""
        return _dense_size_bytes(self, self.embeddings)


class CTRModel(nn.Module, ABC):
    """Base class of click-through model plugins: forward(dense float [B, D], sparse int64 [B, F]) -> logits [B].

    ``embeddings`` maps each categorical field (in column order of ``sparse``) to its embedding module, each
    giving [B, dim] (a :class:`FeatureEmbeddings`, or a mapping of modules, which is wrapped in one); all
    fields are looked up in one call per batch. ``num_dense`` is D, which may be 0.
    """

    summary: ClassVar[str] = ""

    def __init__(self, embeddings: Mapping[str, nn.Module], num_dense: int, dim: int) -> None:
        super().__init__()
        if not embeddings:
            raise ValueError("a click-through model needs at least one categorical field")
        self.embeddings = _feature_embeddings(embeddings)
        self.fields = tuple(self.embeddings.names())
        self.num_dense = num_dense
        self.dim = dim

    def embed(self, sparse: torch.Tensor) -> torch.Tensor:
        """Embeddings [B, F, dim] of the fields' IDs [B, F]."""
        columns = sparse.T.contiguous()  # one contiguous row of IDs per field
        vectors = self.embeddings({name: columns[i] for i, name in enumerate(self.fields)})
        return torch.stack([vectors[name] for name in self.fields], dim=1)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return self.interact(dense, self.embed(sparse))

    @abstractmethod
    def interact(self, dense: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """Logits [B] from dense features [B, D] and field embeddings [B, F, dim]."""

    def embedding_modules(self) -> dict[str, nn.Module]:
        """The embedding module of each field, by field name."""
        return dict(self.embeddings.features.items())

    def dense_size_bytes(self) -> int:
        """Bytes of the model's own parameters, outside the embeddings."""
        return _dense_size_bytes(self, self.embeddings)
