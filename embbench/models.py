"""The model API: a recommendation model is two embedding modules (user, item) and an interaction.

Model plugins subclass :class:`RecModel`. The core builds the user and item embeddings from a scheme and
passes them in; the model never knows which scheme produced them. ``interact_all`` scores every item of the
catalogue for a batch of users, which full-ranking evaluation needs; subclasses override it with a faster
exact form where one exists.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

#: constructor arguments supplied by the core, not by suite files
RESERVED_ARGUMENTS = ("user_embedding", "item_embedding", "dim")


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

    def dense_size_bytes(self) -> int:
        """Bytes of the model's own parameters, outside the embeddings."""
        embedding_params = {id(p) for m in (self.user_embedding, self.item_embedding) for p in m.parameters()}
        return sum(p.numel() * p.element_size() for p in self.parameters() if id(p) not in embedding_params)
