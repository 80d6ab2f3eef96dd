"""GMF and MLP from Neural Collaborative Filtering (He et al., WWW 2017), as used in the DHE paper."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from embbench import RecModel

#: the widest layer and the most layers a model takes: an evaluation batch of 65,536 rows through a layer of
#: 16,384 units holds 4 GiB of activations, the most a 24 GB machine can give one layer
MAX_LAYER_WIDTH = 16_384
MAX_LAYERS = 64


class GMF(RecModel):
    """Generalized Matrix Factorization: logit = h · (p_u ⊙ q_i) + b."""

    summary = "NCF GMF: weighted inner product of user and item embeddings"

    def __init__(self, embeddings: Mapping[str, nn.Module], dim: int) -> None:
        super().__init__(embeddings, dim)
        self.output = nn.Linear(dim, 1)

    def interact(self, user_vectors: torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
        return self.output(user_vectors * item_vectors).squeeze(1)

    def interact_all(self, user_vectors: torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
        return (user_vectors * self.output.weight) @ item_vectors.T + self.output.bias


class MLP(RecModel):
    """NCF MLP: logit = MLP([p_u; q_i]) with ReLU hidden layers (default 256-128-64)."""

    summary = "NCF MLP: concatenated embeddings through a ReLU MLP (256-128-64)"

    #: user-item pairs scored at once by interact_all: their hidden activations (pairs x first hidden width
    #: floats, 16 MiB at the default width) stay in cache; 2^18 pairs was 2.1x slower (one thread, 3,600 items)
    PAIRS_PER_CHUNK = 1 << 14

    def __init__(self, embeddings: Mapping[str, nn.Module], dim: int, hidden: list[int] | None = None) -> None:
        super().__init__(embeddings, dim)
        hidden = [256, 128, 64] if hidden is None else list(hidden)
        if not hidden or len(hidden) > MAX_LAYERS or any(
            isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= MAX_LAYER_WIDTH for w in hidden
        ):
            raise ValueError(
                f"hidden must be a non-empty list of at most {MAX_LAYERS} layer widths in [1, {MAX_LAYER_WIDTH:,}], "
                f"got {hidden}"
            )
        self.hidden = hidden
        self.first = nn.Linear(2 * dim, hidden[0])
        rest: list[nn.Module] = [nn.ReLU()]
        for fan_in, fan_out in zip(hidden[:-1], hidden[1:], strict=False):
            rest += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        rest.append(nn.Linear(hidden[-1], 1))
        self.rest = nn.Sequential(*rest)

    def interact(self, user_vectors: torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
        return self.rest(self.first(torch.cat((user_vectors, item_vectors), dim=1))).squeeze(1)

    def interact_all(self, user_vectors: torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
        # The first layer splits over the concatenation: W [u; i] + b = W_u u + b + W_i i, so it is applied to
        # users and items separately and only the sum is formed per pair.
        weight_user, weight_item = self.first.weight[:, : self.dim], self.first.weight[:, self.dim :]
        user_part = user_vectors @ weight_user.T + self.first.bias
        item_part = item_vectors @ weight_item.T
        num_items = item_vectors.shape[0]
        users_per_chunk = max(1, self.PAIRS_PER_CHUNK // max(num_items, 1))
        items_per_chunk = max(1, self.PAIRS_PER_CHUNK // users_per_chunk)  # a large catalogue is split as well
        rows = []
        for start in range(0, user_part.shape[0], users_per_chunk):
            users = user_part[start : start + users_per_chunk].unsqueeze(1)
            row = [
                self.rest(users + item_part[first : first + items_per_chunk].unsqueeze(0)).squeeze(2)
                for first in range(0, num_items, items_per_chunk)
            ]
            rows.append(torch.cat(row, dim=1))
        return torch.cat(rows, dim=0)
