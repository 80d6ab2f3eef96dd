"""Post-training quantisation of a model's table collection (fp16, int8, int4) through torchrec's quantised
EmbeddingBagCollection, and the exact bytes a quantised feature stores.

Only rows held in the model's :class:`embbench.collection.TableCollection` are quantised; everything else a
scheme stores (ID dictionaries, hash seeds, MLPs) stays as it is. int8 and int4 rows carry torchrec's per-row
fp16 scale and bias (4 bytes) beside the packed values, and rows are laid out with fbgemm's own alignment for
the device (1 byte on a CPU, 16 bytes on a GPU).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from embbench.collection import FeatureEmbeddings, TableCollection, torchrec_available
from embbench.errors import EmbbenchError
from embbench.kernels import TableStore
from embbench.run.settings import PRECISIONS
from embbench.schemes import state_size_bytes, tensor_bytes
from embbench.tables import Lookup

#: bits per stored value of each precision
PRECISION_BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}
#: bytes of the per-row scale and bias (two fp16) that torchrec stores with every int8/int4 row
SCALE_BIAS_BYTES = 4
# fbgemm's CPU kernels read an int8/int4 row's packed values in 2-byte words.
_PACKED_ROW_MULTIPLE = 2


class QuantizationUnavailable(EmbbenchError):
    """A model cannot be quantised at a precision here (no tables, no torchrec, an unsupported row width)."""


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")


def _quantized_dtype(precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "int8": torch.qint8, "int4": torch.quint4x2}[precision]


class QuantizedStore(TableStore):
    """Every table of a collection in one torchrec quantised EmbeddingBagCollection (inference only)."""

    kernel = "quantized"

    def __init__(self, collection: TableCollection, precision: str) -> None:
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        from torchrec.inference.modules import quantize_embeddings
        from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

        specs = collection.specs
        super().__init__(specs)
        self.precision = precision
        self.slot_keys = [slot for spec in specs for slot in spec.slots]
        device = collection.training_config.device
        configs = [
            EmbeddingBagConfig(
                name=spec.key, embedding_dim=spec.table.dim, num_embeddings=spec.table.num_rows,
                feature_names=list(spec.slots),
            )
            for spec in specs
        ]
        holder = nn.Module()
        holder.ebc = EmbeddingBagCollection(tables=configs, is_weighted=self.weighted, device=device)
        with torch.no_grad():
            for spec in specs:
                holder.ebc.embedding_bags[spec.key].weight.copy_(collection.weight(spec.key))
        row_alignment = 1 if device.type == "cpu" else 16  # fbgemm's defaults per device
        quant_prep_customize_row_alignment(holder, [EmbeddingBagCollection], row_alignment)
        with warnings.catch_warnings():  # torchrec's quantisation goes through the deprecated torch.ao API
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao\..*")
            quantize_embeddings(holder, dtype=_quantized_dtype(precision), inplace=True)
        self.ebc = holder.ebc

    def pool(self, lookups: Sequence[Lookup | None], batch: int, device: torch.device) -> list[torch.Tensor]:
        from torchrec import KeyedJaggedTensor

        values, lengths, weights = self._jagged(lookups, batch, device, self.weighted)
        features = KeyedJaggedTensor(keys=self.slot_keys, values=values, lengths=lengths, weights=weights)
        return list(self.ebc(features).values().float().split(self.slot_dims, dim=1))

    def weight(self, key: str) -> torch.Tensor:
        raise QuantizationUnavailable("quantised tables are read through their kernel only; they have no fp32 rows")

    def table_bytes(self, key: str) -> int:
        """Bytes table ``key`` stores at this precision: packed rows, per-row scale and bias, alignment."""
        return tensor_bytes(
            tensor for name, tensor in self.ebc.state_dict(keep_vars=True).items()
            if name.split(".")[1:2] == [key]
        )

    def extra_repr(self) -> str:
        return f"tables={len(self.keys)}, precision={self.precision}"


def _embeddings(model: nn.Module) -> FeatureEmbeddings | None:
    if isinstance(model, FeatureEmbeddings):
        return model
    embeddings = getattr(model, "embeddings", None)
    return embeddings if isinstance(embeddings, FeatureEmbeddings) else None


def _check_quantizable(embeddings: FeatureEmbeddings | None, precision: str) -> TableCollection:
    if embeddings is None or embeddings.tables is None:
        raise QuantizationUnavailable("no embedding tables to quantise")
    for name, module in embeddings.features.items():
        # A module that stores its own compressed form (quantised codes, a sparse form, product-quantisation
        # codes) trains tables that are not what it stores: quantising those would measure nothing real.
        if not getattr(module, "post_training_quantizable", True):
            raise QuantizationUnavailable(
                f"feature '{name}': its scheme stores its own compressed form, not its training tables; "
                "post-training quantisation does not apply (keep precisions = [\"fp32\"] for it)"
            )
    if not torchrec_available():
        raise QuantizationUnavailable("quantised tables need torchrec and fbgemm, which cannot be imported here")
    bits = PRECISION_BITS[precision]
    for spec in embeddings.tables.specs:
        if precision in ("int8", "int4") and (spec.table.dim * bits) % (8 * _PACKED_ROW_MULTIPLE):
            need = _PACKED_ROW_MULTIPLE * 8 // bits
            raise QuantizationUnavailable(
                f"{precision} rows need a dimension divisible by {need} (fbgemm packs rows in 2-byte words); "
                f"this scheme has a table of dimension {spec.table.dim}"
            )
    return embeddings.tables


def quantize_model(model: nn.Module, precision: str) -> nn.Module:
    """A copy of ``model`` (a model with ``.embeddings``, or a FeatureEmbeddings) whose table collection holds
    its rows at ``precision`` (a plain copy for fp32); ``model`` itself is not changed.

    Raises :class:`QuantizationUnavailable` when the model has no table collection, torchrec is missing, or a
    table's dimension does not suit the precision's kernels.
    """
    check_precision(precision)
    if precision == "fp32":
        return copy.deepcopy(model)
    _check_quantizable(_embeddings(model), precision)
    quantized = copy.deepcopy(model)
    collection = _embeddings(quantized).tables  # type: ignore[union-attr]
    assert collection is not None
    collection.replace_stores([QuantizedStore(collection, precision)])
    return quantized.eval()


def quantized_feature_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes each feature stores: its module's own state (ID dictionaries, seeds, networks) and its tables as
    the collection holds them (quantised or fp32)."""
    embeddings = _embeddings(model)
    if embeddings is None:
        raise ValueError("the model has no FeatureEmbeddings")
    sizes = {name: state_size_bytes(module) for name, module in embeddings.features.items()}
    collection = embeddings.tables
    if collection is not None:
        for spec in collection.specs:
            store = collection.store_of(spec.key)
            if isinstance(store, QuantizedStore):
                size = store.table_bytes(spec.key)
            else:
                weight = collection.weight(spec.key)
                size = weight.numel() * weight.element_size()
            sizes[spec.feature] += size
    return sizes
