"""The model APIs. A user-item model (:class:`RecModel`) is two embedding modules and an interaction; a
click-through model (:class:`CTRModel`) is one embedding module per categorical field plus dense features.

Model plugins subclass one of them; the task says which (ranking and rating classification take a
``RecModel``, ``ctr`` a ``CTRModel``). The core builds the embeddings from a scheme and passes them in; the
model never knows which scheme produced them. ``RecModel.interact_all`` scores every item of the catalogue
for a batch of users, which full-ranking evaluation needs; subclasses override it with a faster exact form
where one exists.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

#: constructor arguments supplied by the core, not by suite files
RESERVED_ARGUMENTS = ("user_embedding", "item_embedding", "dim", "embeddings", "num_dense")


def _dense_size_bytes(model: nn.Module, embeddings: Mapping[str, nn.Module]) -> int:
    embedding_params = {id(p) for m in embeddings.values() for p in m.parameters()}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in embedding_params)


class RecModel(nn.Module, ABC):
    """Base class of model plugins: forward(user IDs [B], item IDs [B]) -> logits [B]."""

    summary: ClassVar[str] = ""

    def __init__(self, user_embedding: nn.Module, item_embedding: nn.Module, dim: int) -> None:
        super().__init__()
        self.user_embedding = user_embedding
        self.item_embedding = item_embedding
        self.dim = dim

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.interact(self.user_embedding(users), self.item_embedding(items))

    @abstractmethod
    def interact(self, user_vectors: torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
        """Logits [B] for paired user and item embeddings [B, dim]."""

    def interact_all(self, user_vectors: torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
        """Logits [B, M] for every user of [B, dim] against every item of [M, dim]."""
        batch, num_items = user_vectors.shape[0], item_vectors.shape[0]
        users = user_vectors.unsqueeze(1).expand(batch, num_items, -1).reshape(batch * num_items, -1)
        items = item_vectors.unsqueeze(0).expand(batch, num_items, -1).reshape(batch * num_items, -1)
        return self.interact(users, items).reshape(batch, num_items)

    def extra_config(self) -> dict[str, Any]:
        """Hyper-parameters to record with results."""
        return {}

    def embedding_modules(self) -> dict[str, nn.Module]:
        """The embedding module of each feature, by feature name."""
        return {"user": self.user_embedding, "item": self.item_embedding}

    def dense_size_bytes(self) -> int:
        """Bytes of the model's own parameters, outside the embeddings."""
        return _dense_size_bytes(self, self.embedding_modules())


class CTRModel(nn.Module, ABC):
    """Base class of click-through model plugins: forward(dense float [B, D], sparse int64 [B, F]) -> logits [B].

    ``embeddings`` maps each categorical field (in column order of ``sparse``) to its embedding module, each
    giving [B, dim]; ``num_dense`` is D, which may be 0.
    """

    summary: ClassVar[str] = ""

    def __init__(self, embeddings: Mapping[str, nn.Module], num_dense: int, dim: int) -> None:
        super().__init__()
        if not embeddings:
            raise ValueError("a click-through model needs at least one categorical field")
        self.fields = tuple(embeddings)
        self.embeddings = nn.ModuleDict(dict(embeddings))
        self.num_dense = num_dense
        self.dim = dim

    def embed(self, sparse: torch.Tensor) -> torch.Tensor:
        """Embeddings [B, F, dim] of the fields' IDs [B, F]."""
        columns = sparse.T.contiguous()  # one contiguous row of IDs per field
        return torch.stack([self.embeddings[name](columns[i]) for i, name in enumerate(self.fields)], dim=1)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return self.interact(dense, self.embed(sparse))

    @abstractmethod
    def interact(self, dense: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """Logits [B] from dense features [B, D] and field embeddings [B, F, dim]."""

    def embedding_modules(self) -> dict[str, nn.Module]:
        return dict(self.embeddings.items())

    def extra_config(self) -> dict[str, Any]:
        return {}

    def dense_size_bytes(self) -> int:
        """Bytes of the model's own parameters, outside the embeddings."""
        return _dense_size_bytes(self, self.embedding_modules())
