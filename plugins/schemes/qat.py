"""``qat``: quantisation-aware training of one table (LSQ: Esser et al., ICLR 2020; ALPT: Li et al., AAAI 2023) —
rows are stored as int16, int8 or int4 codes times a step (learned, per table or per row; or fixed); training keeps an
fp32 shadow of the rows, and every forward, in training and in evaluation, reads the quantised rows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from embbench import (
    DEFAULT_INIT_STD,
    ID_BYTES,
    MERSENNE_PRIME,
    BudgetTooSmall,
    EmbeddingTable,
    FeatureSpec,
    HashFamily,
    Lookup,
    Scheme,
    SchemePlan,
    TableBackedEmbedding,
    TableInit,
    VocabularyIndex,
    largest_fitting,
)

#: the code widths, widest first; ``bits="auto"`` takes the widest whose table with a row per training ID fits the
#: budget, and AUTO_HASHED_BITS with hashed rows below all three
BITS = (16, 8, 4)
AUTO_HASHED_BITS = 8
STEPS = ("learned", "fixed")
STEP_PER = ("table", "row")
#: how fast a learned step moves under a normalised (Adam-type) table optimizer: by a factor up to
#: exp(rate·lr) per update
DEFAULT_STEP_RATE = 10.0
#: a step is stored in fp16
STEP_BYTES = 2
#: steps are kept in [MIN_STEP, MAX_STEP]: fp16's smallest normal number, and far below its largest
MIN_STEP = 2.0**-14
MAX_STEP = 2.0**10


def code_range(bits: int) -> tuple[int, int]:
    """The integers a ``bits``-bit code holds: [-2^(b-1), 2^(b-1) - 1]."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def as_fp16(value: float) -> float:
    """``value`` rounded to the nearest fp16 number (steps are stored in fp16)."""
    return float(torch.tensor(value, dtype=torch.float32).to(torch.float16))


def lsq_initial_step(bits: int, init_std: float = DEFAULT_INIT_STD) -> float:
    """LSQ's initial step 2·E|w| / sqrt(Q_p) for rows that start N(0, init_std^2) (E|w| = init_std·sqrt(2/pi)),
    in fp16: about 1.4e-3 for int8 and 6.0e-3 for int4 at the tables' 0.01."""
    mean_magnitude = init_std * math.sqrt(2.0 / math.pi)
    return as_fp16(2.0 * mean_magnitude / math.sqrt(code_range(bits)[1]))


def code_dtype(bits: int) -> torch.dtype:
    """The integer type a code is held in: int16 for 16 bits, else int8 (int4 codes are then packed)."""
    return torch.int16 if bits == 16 else torch.int8


def values_bytes(rows: int, dim: int, bits: int) -> int:
    """Bytes of ``rows`` x ``dim`` codes of ``bits`` bits, int4 packed two per byte (over the flattened rows)."""
    return -(-rows * dim * bits // 8)


def quantise(rows: torch.Tensor, steps: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer codes round(clamp(rows / step)) (float, exact integers); ``steps`` broadcasts over ``rows``."""
    lowest, highest = code_range(bits)
    return (rows / steps).clamp(lowest, highest).round()


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int16 [R, d] for 16 bits, int8 [R, d] for 8; for 4 bits uint8 [ceil(R·d / 2)]: value 2k in the low nibble
    of byte k, value 2k + 1 in its high nibble (two's complement nibbles)."""
    codes = codes.to(code_dtype(bits))
    if bits in (16, 8):
        return codes
    nibbles = (codes.reshape(-1).to(torch.int16) & 0xF).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_codes(packed: torch.Tensor, rows: int, dim: int, bits: int) -> torch.Tensor:
    """The codes [R, d] that :func:`pack_codes` packed (int16 for 16 bits, else int8)."""
    if bits in (16, 8):
        return packed.to(code_dtype(bits)).reshape(rows, dim)
    packed = packed.to(torch.uint8)
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[: rows * dim].to(torch.int16)
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8).reshape(rows, dim)


class _FakeQuantise(torch.autograd.Function):
    """code(v, s)·s with code = round(clamp(v / s, lowest, highest)), and LSQ's straight-through gradients:
    d/dv = 1 inside the range, 0 where clipped; d/ds = code - v/s inside, the clipped code outside, summed over
    the values sharing a step and times the gradient scale."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, rows: torch.Tensor, steps: torch.Tensor, lowest: int, highest: int, gradient_scale: float
    ) -> torch.Tensor:
        scaled = rows / steps
        codes = scaled.clamp(lowest, highest).round()
        ctx.save_for_backward(scaled, codes)
        ctx.lowest, ctx.highest, ctx.gradient_scale, ctx.steps_shape = lowest, highest, gradient_scale, steps.shape
        return codes * steps

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        scaled, codes = ctx.saved_tensors
        inside = (scaled >= ctx.lowest) & (scaled <= ctx.highest)
        grad_rows = grad * inside if ctx.needs_input_grad[0] else None
        grad_steps = None
        if ctx.needs_input_grad[1]:
            local = torch.where(inside, codes - scaled, codes)
            grad_steps = (grad * local).sum_to_size(ctx.steps_shape) * ctx.gradient_scale
        return grad_rows, grad_steps, None, None, None


class _StepOfLogRatio(torch.autograd.Function):
    """s = fp16(clamp(s_0·exp(rate·theta))): the step a stored theta = log(s / s_0) / rate gives. Backward hands
    theta dL/ds / (rate·s), so that an SGD step on theta is, to first order, LSQ's SGD step on s itself
    (s - lr·dL/ds), while s stays positive and a normalised step of theta (Adam's, about lr) changes s by a factor
    of about exp(±rate·lr)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, log_ratio: torch.Tensor, initial_step: float, rate: float
    ) -> torch.Tensor:
        steps = (initial_step * torch.exp(rate * log_ratio)).clamp(MIN_STEP, MAX_STEP)
        steps = steps.to(torch.float16).to(torch.float32)
        ctx.save_for_backward(steps)
        ctx.rate = rate
        return steps

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (steps,) = ctx.saved_tensors
        return grad / (ctx.rate * steps), None, None


def _store_quantised(module: QATLookup, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """The module's state holds its rows as codes and fp16 steps, never the fp32 shadow. Inside a model's table
    collection the module does not hold the rows (the collection holds and saves the shadow): nothing to do."""
    key = f"{prefix}table.weight"
    if key not in state_dict:
        return
    del state_dict[key]
    with torch.no_grad():
        steps = module.row_steps()
        state_dict[f"{prefix}codes"] = pack_codes(module.row_codes(steps), module.bits)
        if module.step_kind == "learned":
            del state_dict[f"{prefix}{module.log_step_key}"]
            stored = steps if module.step_per == "row" else steps[:1]
            state_dict[f"{prefix}steps"] = stored.to(torch.float16)


class QATLookup(TableBackedEmbedding):
    """x -> row i(x) (its rank in the training vocabulary, or a hash of x) -> the row's codes times its step; an
    ID outside the dictionary embeds to zeros (no stored row: the one embedding all unseen IDs share).

    ``table`` is the fp32 shadow the table optimizer trains. A learned step is stored as theta =
    log(s / s_0) / ``step_rate``: per row in the table ``log_steps`` (trained with the rows), or one for the
    table, the parameter ``log_step`` (trained by the dense optimizer). A fixed step is the fp16 buffer ``steps``.
    """
    #: the stored form is this module's own (see the docstring): the precisions axis does not apply
    post_training_quantizable = False

    def __init__(
        self,
        rows: int,
        dim: int,
        bits: int,
        step: str,
        step_per: str,
        initial_step: float,
        step_rate: float,
        seed: int,
        vocabulary: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.mapping = "hash" if vocabulary is None else "dictionary"
        if vocabulary is None:
            self.hash = HashFamily(1, rows, seed=seed)
        else:
            if rows != len(vocabulary):
                raise ValueError(f"a dictionary of {len(vocabulary)} IDs needs {len(vocabulary)} rows, got {rows}")
            self.vocabulary = VocabularyIndex(vocabulary)
        self.num_rows, self.dim, self.bits = rows, dim, bits
        self.step_kind, self.step_per, self.step_rate = step, step_per, float(step_rate)
        self.initial_step = as_fp16(initial_step)
        self.lowest, self.highest = code_range(bits)
        self.table = EmbeddingTable(rows, dim, seed=seed + 1)
        self.log_step_key = ""
        if step == "learned" and step_per == "row":
            # Every row starts at s_0 (theta = 0): a table of zeros, trained by the table optimizer with the rows.
            self.log_steps = EmbeddingTable(rows, 1, seed=seed + 2, init=TableInit("normal", 0.0), auxiliary=True)
            self.log_step_key = "log_steps.weight"
        elif step == "learned":
            self.log_step = nn.Parameter(torch.zeros(1))
            self.log_step_key = "log_step"
        else:
            self.register_buffer("steps", torch.tensor([self.initial_step], dtype=torch.float16))
        self.register_state_dict_post_hook(_store_quantised)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 [N]: the row each ID reads; R (no row: a zero embedding) for an ID outside the dictionary."""
        if self.mapping == "hash":
            return self.hash(ids)[:, 0]
        return self.vocabulary(ids)  # rank 0..n-1, n = R for an unseen ID

    def index_tuples(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids).unsqueeze(1)

    def lookups(self, ids: torch.Tensor) -> list[Lookup]:
        """Each ID's row, in the shadow table and (learned steps per row) in the step table; an unseen ID of the
        dictionary reads no row (an empty bag: a zero vector, whose codes are all 0)."""
        rows = self.rows(ids)
        tables = [self.table, self.log_steps] if self.log_step_key == "log_steps.weight" else [self.table]
        if self.mapping == "hash":
            return [table.lookup(rows) for table in tables]
        known = rows < self.num_rows
        indices, lengths = rows[known], known.to(torch.int64)
        return [table.lookup(indices, lengths=lengths) for table in tables]

    def combine(self, ids: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        # LSQ's gradient scale 1/sqrt(N·Q_p), N the values that share a step: a row's d, or the batch's N·d.
        if self.step_kind == "fixed":
            steps, shared_by = self.steps.to(torch.float32), self.dim
        elif self.step_per == "row":
            steps, shared_by = _StepOfLogRatio.apply(pooled[1], self.initial_step, self.step_rate), self.dim
        else:
            steps = _StepOfLogRatio.apply(self.log_step, self.initial_step, self.step_rate)
            shared_by = max(1, ids.numel()) * self.dim
        gradient_scale = 1.0 / math.sqrt(shared_by * self.highest)
        return _FakeQuantise.apply(pooled[0], steps, self.lowest, self.highest, gradient_scale)

    def row_steps(self) -> torch.Tensor:
        """float32 [R]: every row's step (an fp16 number)."""
        if self.step_kind == "fixed":
            return self.steps.to(torch.float32).expand(self.num_rows)
        if self.step_per == "row":
            return _StepOfLogRatio.apply(self.log_steps.weight[:, 0].detach(), self.initial_step, self.step_rate)
        step = _StepOfLogRatio.apply(self.log_step.detach(), self.initial_step, self.step_rate)
        return step.expand(self.num_rows)

    def row_codes(self, steps: torch.Tensor | None = None) -> torch.Tensor:
        """int8 [R, d] (int16 for 16 bits): every row's codes, in [-2^(b-1), 2^(b-1) - 1]."""
        steps = self.row_steps() if steps is None else steps
        return quantise(self.table.weight.detach(), steps.unsqueeze(1), self.bits).to(code_dtype(self.bits))

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        """Codes and steps (what ``state_dict`` gives) become the shadow rows code·step and theta, so that the
        module embeds exactly as the one saved did."""
        packed = state_dict.pop(f"{prefix}codes", None)
        learned = self.step_kind == "learned"
        steps = state_dict.pop(f"{prefix}steps", None) if learned else state_dict.get(f"{prefix}steps")
        if packed is not None and steps is not None:
            steps = steps.to(torch.float32)
            codes = unpack_codes(packed, self.num_rows, self.dim, self.bits)
            rows = codes.to(torch.float32) * steps.expand(self.num_rows).unsqueeze(1)
            log_ratio = torch.log(steps / self.initial_step) / self.step_rate
            if self.step_per == "row":
                log_ratio = log_ratio.unsqueeze(1)
            if self.table.bound:  # a model's collection holds the rows: write them there
                with torch.no_grad():
                    self.table.weight.copy_(rows)
                    if self.log_step_key == "log_steps.weight":
                        self.log_steps.weight.copy_(log_ratio)
                if self.log_step_key == "log_step":
                    state_dict[f"{prefix}log_step"] = log_ratio
            else:
                state_dict[f"{prefix}table.weight"] = rows
                if learned:
                    state_dict[f"{prefix}{self.log_step_key}"] = log_ratio
        elif packed is not None or (learned and steps is not None):
            missing_keys.append(f"{prefix}steps" if packed is not None else f"{prefix}codes")
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"rows={self.num_rows}, dim={self.dim}, bits={self.bits}, step={self.step_kind} per {self.step_per}, "
            f"initial_step={self.initial_step:g}, step_rate={self.step_rate:g}, mapping={self.mapping}"
        )


class QuantizationAwareTraining(Scheme):
    """QAT: int16/int8/int4 rows times a learned (LSQ) or fixed step, one per table or (learned) one per row; a row
    per training ID through the ID dictionary where the quantised table fits, else hashed rows solved from the
    budget. ``bits="auto"`` (the default) takes the widest of 16, 8, 4 bits whose table with a row per training ID
    fits, and int8 hashed rows below that."""

    summary = "quantisation-aware training (LSQ/ALPT): int16/8/4 rows times a learned step, fp32 shadow in training"
    unseen = "collided"
    # With the width given, above its quantised table with a row per training ID there is nothing more to spend the
    # budget on (the instance attribute says so); "auto" widens the codes instead.
    fills_budget = False

    def __init__(
        self,
        bits: Literal["auto", 16, 8, 4] = "auto",
        step: Literal["learned", "fixed"] = "learned",
        step_per: Literal["table", "row"] = "table",
        initial_step: float | None = None,
        step_rate: float = DEFAULT_STEP_RATE,
        rows: int | None = None,
    ) -> None:
        if bits != "auto" and bits not in BITS:
            raise ValueError(f"bits must be 16, 8, 4 (int16, int8 or int4 codes) or auto, got {bits!r}")
        if step not in STEPS:
            raise ValueError(f"step must be one of {', '.join(STEPS)}, got {step!r}")
        if step_per not in STEP_PER:
            raise ValueError(f"step_per must be one of {', '.join(STEP_PER)}, got {step_per!r}")
        if step == "fixed" and step_per == "row":
            raise ValueError("step_per='row' needs step='learned' (a fixed step is one for the whole table)")
        if initial_step is not None and not MIN_STEP <= initial_step <= MAX_STEP:
            raise ValueError(
                f"initial_step must be in [2^-14, 2^10] or unset (LSQ's initialisation), got {initial_step}"
            )
        if not 0.01 <= step_rate <= 1000.0:
            raise ValueError(f"step_rate must be in [0.01, 1000], got {step_rate}")
        if rows is not None and not 1 <= rows <= MERSENNE_PRIME:
            raise ValueError(
                f"rows must be in [1, {MERSENNE_PRIME}] (hashed rows) or unset (solved from the budget), got {rows}"
            )
        self.bits, self.step, self.step_per, self.initial_step = bits, step, step_per, initial_step
        self.step_rate, self.rows = step_rate, rows
        self.fills_budget = bits == "auto" and rows is None

    def size_bytes(self, rows: int, dim: int, index_bytes: int, bits: int) -> int:
        """``bits``-bit codes, fp16 steps (one per row, or one), and the index (the ID dictionary, or the hash
        seed)."""
        steps = rows if self.step == "learned" and self.step_per == "row" else 1
        return values_bytes(rows, dim, bits) + steps * STEP_BYTES + index_bytes

    def plan(self, feature: FeatureSpec, budget_bytes: int) -> SchemePlan:
        dim = feature.dim
        widths = BITS if self.bits == "auto" else (int(self.bits),)
        if self.rows is None and feature.num_ids > 0:
            rows = feature.num_ids  # unseen IDs share the zero embedding, which needs no row
            index_bytes = VocabularyIndex.size_bytes(feature.ids)
            for bits in widths:
                size = self.size_bytes(rows, dim, index_bytes, bits)
                if size <= budget_bytes:
                    initial_step = self._initial_step(bits)
                    params = dict(
                        self.get_params(), bits=bits, rows=rows, mapping="dictionary", initial_step=initial_step
                    )
                    notes = {"initial_step": initial_step}
                    return SchemePlan(self.name, params, size, budget_bytes, notes, unseen="dedicated")
        bits = AUTO_HASHED_BITS if self.bits == "auto" else int(self.bits)
        if self.rows is None:
            minimum = self.size_bytes(1, dim, ID_BYTES, bits)
            if minimum > budget_bytes:
                raise BudgetTooSmall(self.name, budget_bytes, minimum, "one hashed row, its step and the hash seed")
            rows = largest_fitting(
                lambda r: self.size_bytes(r, dim, ID_BYTES, bits), 1, MERSENNE_PRIME, budget_bytes
            )
            assert rows is not None
        else:
            rows = self.rows
            minimum = self.size_bytes(rows, dim, ID_BYTES, bits)
            if minimum > budget_bytes:
                raise BudgetTooSmall(self.name, budget_bytes, minimum, f"{rows:,} hashed rows")
        initial_step = self._initial_step(bits)
        params = dict(self.get_params(), bits=bits, rows=rows, mapping="hash", initial_step=initial_step)
        size = self.size_bytes(rows, dim, ID_BYTES, bits)
        return SchemePlan(self.name, params, size, budget_bytes, {"initial_step": initial_step}, unseen="collided")

    def _initial_step(self, bits: int) -> float:
        return as_fp16(self.initial_step) if self.initial_step is not None else lsq_initial_step(bits)

    def build(self, feature: FeatureSpec, plan: SchemePlan, seed: int) -> nn.Module:
        p = plan.params
        vocabulary = np.asarray(feature.ids, dtype=np.int64) if p["mapping"] == "dictionary" else None
        return QATLookup(
            p["rows"], feature.dim, p["bits"], p["step"], p["step_per"], p["initial_step"], p["step_rate"], seed,
            vocabulary,
        )
