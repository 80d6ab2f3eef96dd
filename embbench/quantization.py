"""Post-training quantisation of a scheme's embedding tables (fp16, int8, int4) through torchrec's quantised
EmbeddingBagCollection, and the exact size of what a quantised module stores.

Only rows kept in :class:`~embbench.tables.EmbeddingTable` modules are quantised; everything else a scheme
stores (ID dictionaries, hash seeds, MLPs) stays as it is. int8 and int4 rows carry torchrec's per-row fp16
scale and bias (4 bytes) beside the packed values, and rows are laid out with fbgemm's own alignment for the
device (1 byte on a CPU, 16 bytes on a GPU).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from embbench.errors import EmbbenchError
from embbench.tables import EmbeddingTable, torchrec_available

PRECISIONS = ("fp32", "fp16", "int8", "int4")
#: bits per stored value of each quantised precision
PRECISION_BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}
#: bytes of the per-row scale and bias (two fp16) that torchrec stores with every int8/int4 row
SCALE_BIAS_BYTES = 4
# fbgemm's CPU kernels read an int8/int4 row's packed values in 2-byte words.
_PACKED_ROW_MULTIPLE = 2


class QuantizationUnavailable(EmbbenchError):
    """A module cannot be quantised at a precision here (no tables, no torchrec, an unsupported row width)."""


def _quantized_dtype(precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "int8": torch.qint8, "int4": torch.quint4x2}[precision]


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")


class QuantizedEmbeddingTable(nn.Module):
    """An :class:`EmbeddingTable` whose rows are stored at ``precision`` in torchrec's quantised
    EmbeddingBagCollection; forward(indices [N] or [N, k], per_sample_weights) -> fp32 [N, dim], inference only.
    """

    def __init__(self, table: EmbeddingTable, precision: str) -> None:
        super().__init__()
        from torchrec import EmbeddingBagCollection
        from torchrec.inference.modules import quantize_embeddings
        from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

        self.num_rows, self.dim, self.weighted, self.precision = table.num_rows, table.dim, table.weighted, precision
        holder = nn.Module()
        holder.ebc = copy.deepcopy(table.ebc)  # the alignment setting below must not touch the trained table
        row_alignment = 1 if table.weight.device.type == "cpu" else 16  # fbgemm's defaults per device
        quant_prep_customize_row_alignment(holder, [EmbeddingBagCollection], row_alignment)
        with warnings.catch_warnings():  # torchrec's quantisation goes through the deprecated torch.ao API
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao\..*")
            quantize_embeddings(holder, dtype=_quantized_dtype(precision), inplace=True)
        self.ebc = holder.ebc

    def forward(self, indices: torch.Tensor, per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        from torchrec import KeyedJaggedTensor

        if indices.dim() == 1:
            indices = indices.unsqueeze(1)
            if per_sample_weights is not None:
                per_sample_weights = per_sample_weights.unsqueeze(1)
        batch, width = indices.shape
        kjt = KeyedJaggedTensor(
            keys=["ids"],
            # fbgemm's quantised kernels read the raw buffers: a strided view (a column of index tuples) must
            # be made contiguous first, or they read the wrong IDs
            values=indices.reshape(-1).contiguous(),
            lengths=torch.full((batch,), width, dtype=torch.int64, device=indices.device),
            weights=None if per_sample_weights is None else per_sample_weights.reshape(-1).float().contiguous(),
        )
        return self.ebc(kjt)["ids"]

    def extra_repr(self) -> str:
        return f"num_rows={self.num_rows}, dim={self.dim}, precision={self.precision}"


def embedding_tables(module: nn.Module) -> list[EmbeddingTable]:
    """The distinct EmbeddingTable modules inside ``module``."""
    return [child for child in module.modules() if isinstance(child, EmbeddingTable)]


def _check_quantizable(module: nn.Module, precision: str) -> None:
    tables = embedding_tables(module)
    if not tables:
        raise QuantizationUnavailable("no embedding tables to quantise")
    if not torchrec_available():
        raise QuantizationUnavailable("quantised tables need torchrec and fbgemm, which cannot be imported here")
    for table in tables:
        if table.backend != "torchrec":
            raise QuantizationUnavailable(
                f"tables use the '{table.backend}' backend; quantised tables need torchrec tables "
                "(unset EMBBENCH_TABLE_BACKEND or set it to torchrec)"
            )
        bits = PRECISION_BITS[precision]
        if precision in ("int8", "int4") and (table.dim * bits) % (8 * _PACKED_ROW_MULTIPLE):
            need = _PACKED_ROW_MULTIPLE * 8 // bits
            raise QuantizationUnavailable(
                f"{precision} rows need a dimension divisible by {need} (fbgemm packs rows in 2-byte words); "
                f"this scheme has a table of dimension {table.dim}"
            )


def quantize_tables(module: nn.Module, precision: str) -> nn.Module:
    """A copy of ``module`` with every EmbeddingTable replaced by a :class:`QuantizedEmbeddingTable` at
    ``precision`` (a plain copy for fp32); ``module`` itself is not changed.

    Raises :class:`QuantizationUnavailable` when the module has no tables, torchrec is missing, tables use the
    torch backend, or a table's dimension does not suit the precision's kernels.
    """
    check_precision(precision)
    if precision == "fp32":
        return copy.deepcopy(module)
    _check_quantizable(module, precision)
    if isinstance(module, EmbeddingTable):
        return QuantizedEmbeddingTable(module, precision)
    quantized = copy.deepcopy(module)
    replacements: dict[int, QuantizedEmbeddingTable] = {}
    for parent in list(quantized.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, EmbeddingTable):
                if id(child) not in replacements:  # a table shared by two parents stays shared
                    replacements[id(child)] = QuantizedEmbeddingTable(child, precision)
                setattr(parent, name, replacements[id(child)])
    return quantized


def quantized_size_bytes(module: nn.Module) -> int:
    """Bytes ``module`` stores (its state_dict, shared storage once), counting packed sub-byte tensors (torchrec's
    UInt4Tensor) by the bytes underneath; equal to ``state_size_bytes`` for a module with no quantised tables."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in module.state_dict(keep_vars=True).values():
        packed = getattr(tensor, "elem", None)  # UIntXTensor wraps its uint8 bytes in .elem
        if isinstance(packed, torch.Tensor):
            tensor = packed
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def expected_row_bytes(dim: int, precision: str) -> int:
    """Bytes of one quantised row on a CPU: the packed values plus, for int8/int4, the per-row scale and bias."""
    check_precision(precision)
    values = dim * PRECISION_BITS[precision] // 8
    return values + (SCALE_BIAS_BYTES if precision in ("int8", "int4") else 0)
