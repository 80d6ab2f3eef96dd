"""DLRM (Naumov et al., 2019): dense features through a bottom MLP, pairwise dot products of all field
embeddings and the bottom output, and a top MLP on [bottom output; interactions]."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from embbench import CTRModel

INTERACTIONS = ("dot", "cat")


def _mlp(widths: list[int], last_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=False)):
        layers.append(nn.Linear(fan_in, fan_out))
        if last_activation or index < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


#: the widest layer and the most layers a model takes: an evaluation batch of 65,536 rows through a layer of
#: 16,384 units holds 4 GiB of activations, the most a 24 GB machine can give one layer
MAX_LAYER_WIDTH = 16_384
MAX_LAYERS = 64


def _check_widths(name: str, widths: list[int]) -> list[int]:
    widths = list(widths)
    if len(widths) > MAX_LAYERS or any(
        isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= MAX_LAYER_WIDTH for w in widths
    ):
        raise ValueError(
            f"{name} must be a list of at most {MAX_LAYERS} layer widths in [1, {MAX_LAYER_WIDTH:,}], got {widths}"
        )
    return widths


class DLRM(CTRModel):
    """DLRM: bottom MLP on dense features, dot (or concatenation) interaction, top MLP."""

    summary = "DLRM: bottom MLP on dense features, pairwise dot interactions of field embeddings, top MLP"

    def __init__(
        self,
        embeddings: Mapping[str, nn.Module],
        num_dense: int,
        dim: int,
        bottom: list[int] | None = None,
        top: list[int] | None = None,
        interaction: str = "dot",
    ) -> None:
        super().__init__(embeddings, num_dense, dim)
        if interaction not in INTERACTIONS:
            raise ValueError(f"interaction must be one of {', '.join(INTERACTIONS)}, got '{interaction}'")
        self.bottom_widths = _check_widths("bottom", [64] if bottom is None else bottom)
        self.top_widths = _check_widths("top", [128, 64] if top is None else top)
        self.interaction = interaction
        # The bottom MLP ends at the embedding width, so its output joins the interaction like a field.
        self.bottom = _mlp([num_dense, *self.bottom_widths, dim], last_activation=True) if num_dense else None
        vectors = len(self.fields) + (1 if num_dense else 0)
        if interaction == "dot":
            rows, cols = torch.triu_indices(vectors, vectors, offset=1)
            self.register_buffer("pair_rows", rows, persistent=False)
            self.register_buffer("pair_cols", cols, persistent=False)
            top_in = (dim if num_dense else 0) + len(rows)
        else:
            top_in = vectors * dim
        self.top = _mlp([top_in, *self.top_widths, 1], last_activation=False)

    def interact(self, dense: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        if self.bottom is not None:
            bottom = self.bottom(dense)
            vectors = torch.cat((bottom.unsqueeze(1), embedded), dim=1)
        else:
            bottom, vectors = None, embedded
        if self.interaction == "cat":
            features = vectors.flatten(1)
        else:
            gram = vectors @ vectors.transpose(1, 2)
            pairs = gram[:, self.pair_rows, self.pair_cols]
            features = pairs if bottom is None else torch.cat((bottom, pairs), dim=1)
        return self.top(features).squeeze(1)

