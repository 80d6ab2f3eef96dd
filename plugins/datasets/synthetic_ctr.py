"""Seeded DLRM-style click data at any vocabulary size: Zipf IDs per field, dense features, a logistic label.

With F = ``num_fields``, V = ``vocabulary_size``, k = ``latent_dim`` and D = ``num_dense``, each row is drawn
independently:

* for each field f, an ID index i_f ~ Zipf(V, ``zipf_exponent``) (:class:`ZipfLaw`: index 0 is the most
  frequent), and its raw ID ``raw_ids(i_f * F + f)``: a fixed bijection of [0, 2^62) applied to the
  interleaved index, so each field's IDs are spread-out non-negative int64 and no two fields share an ID
  (hence V * F <= 2^62);
* dense features x ~ N(0, I_D), float32;
* the label y ~ Bernoulli(sigmoid(logit)) with

      logit = b + a * sum_f w_f(i_f) + c * sum_{f<g} <v_f(i_f), v_g(i_g)> / k + x . u

  where (w_f(i), v_f(i)) in R^(1+k) is ``hashed_normal(i, 1 + k, seed_f)``, a pure function of the index,
  the field and the seed (nothing is stored per ID), and u is a seeded vector of norm 0.6. The scales
  a = 1 / sqrt(F) and c = sqrt(2k / (F (F - 1))) make the first-order and the pairwise terms unit-variance
  whatever F and k, so the Bayes AUC (ranking rows by the true logit) is about 0.8 at the defaults. The
  bias b is solved (bisection) so that the mean click probability over a fixed calibration draw of 32,768
  rows is 0.25, whatever the parameters.

Generation streams 65,536 rows at a time; chunk c of split s draws from its own generator seeded with
(seed, s, c), so the arrays depend on the parameters only, and train, validation and test are independent
draws from one distribution. Memory and time do not depend on V: a vocabulary of 10^9 costs what 10^3 does.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from embbench_plugins.datasets.synthetic import ZipfLaw, _check_float, _check_int, hashed_normal, raw_ids

from embbench import SPLITS, CTRData, CTRDataset, CTRFrame

# Bump when the generated data changes for the same parameters: it is part of the fingerprint.
GENERATOR_VERSION = "synthetic-ctr/v1"

CHUNK_ROWS = 1 << 16
MAX_IDS = 1 << 62  # vocabulary_size * num_fields, so that the fields' ID ranges are disjoint
TARGET_CLICK_RATE = 0.25
_CALIBRATION_ROWS = 1 << 15
_DENSE_NORM = 0.6
_ID_MASK = np.uint64(MAX_IDS - 1)
_ID_MULTIPLIER = np.uint64(0x2C1B3C6D6A09E667)  # odd: invertible modulo 2^62
_ID_OFFSET = np.uint64(0x0BB67AE8584CAA73)
_ID_INVERSE = np.uint64(pow(int(_ID_MULTIPLIER), -1, MAX_IDS))
# Stream tags of the generators: one per split, then the calibration draw, the field seeds and u.
_STREAMS = {"train": 1, "validation": 2, "test": 3, "calibration": 4}
_FIELD_SEEDS, _DENSE_WEIGHTS = 5, 6


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * values))


class SyntheticCTR(CTRDataset):
    """Seeded click data: Zipf IDs in F fields, dense features, a logistic label with pairwise interactions."""

    summary = "seeded DLRM-style click data: Zipf IDs per field at any vocabulary size, dense features; no files"

    def __init__(
        self,
        num_fields: int = 8,
        vocabulary_size: int = 1_000_000,
        zipf_exponent: float = 1.05,
        num_dense: int = 4,
        train_rows: int = 200_000,
        validation_rows: int = 20_000,
        test_rows: int = 20_000,
        latent_dim: int = 4,
        seed: int = 0,
        data_dir: str | Path | None = None,
    ) -> None:
        _check_int("num_fields", num_fields, 1, 1024)
        _check_int("vocabulary_size", vocabulary_size, 1, MAX_IDS // int(num_fields))
        _check_float("zipf_exponent", zipf_exponent, 0.0, 3.0)
        _check_int("num_dense", num_dense, 0, 64)
        _check_int("train_rows", train_rows, 1)
        _check_int("validation_rows", validation_rows, 1)
        _check_int("test_rows", test_rows, 1)
        _check_int("latent_dim", latent_dim, 1, 64)
        _check_int("seed", seed, 0, 2**63 - 1)
        params = {
            "num_fields": int(num_fields),
            "vocabulary_size": int(vocabulary_size),
            "zipf_exponent": float(zipf_exponent),
            "num_dense": int(num_dense),
            "train_rows": int(train_rows),
            "validation_rows": int(validation_rows),
            "test_rows": int(test_rows),
            "latent_dim": int(latent_dim),
            "seed": int(seed),
        }
        super().__init__(data_dir, **params)
        fields, dim = params["num_fields"], params["latent_dim"]
        self.fields = tuple(f"C{f}" for f in range(1, fields + 1))
        self.dense_names = tuple(f"I{d}" for d in range(1, params["num_dense"] + 1))
        self.zipf = ZipfLaw(params["vocabulary_size"], params["zipf_exponent"])
        self.first_order_scale = 1.0 / math.sqrt(fields)
        self.pairwise_scale = math.sqrt(2.0 * dim / (fields * (fields - 1))) if fields > 1 else 0.0
        field_seeds = np.random.SeedSequence([params["seed"], _FIELD_SEEDS]).generate_state(fields, np.uint64)
        self.field_seeds = [int(value) for value in field_seeds]
        direction = np.random.default_rng([params["seed"], _DENSE_WEIGHTS]).standard_normal(params["num_dense"])
        norm = float(np.linalg.norm(direction))
        self.dense_weights = direction * (_DENSE_NORM / norm) if norm > 0 else direction
        self._bias: float | None = None

    def fingerprint(self) -> str:
        material = json.dumps({"generator": GENERATOR_VERSION, **self.params}, sort_keys=True)
        return hashlib.sha256(material.encode()).hexdigest()

    def rows(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got '{split}'")
        return self.params[f"{split}_rows"]

    def raw_ids(self, indices: np.ndarray, field: int) -> np.ndarray:
        """Raw IDs of ID indices (0: the most frequent) of field ``field`` (0-based)."""
        interleaved = np.asarray(indices, dtype=np.int64) * self.params["num_fields"] + field
        return raw_ids(interleaved, _ID_MULTIPLIER, _ID_OFFSET)

    def decode_ids(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The (index, 0-based field) of raw IDs: the inverse of :meth:`raw_ids`."""
        interleaved = ((np.asarray(ids, dtype=np.int64).astype(np.uint64) - _ID_OFFSET) * _ID_INVERSE) & _ID_MASK
        interleaved = interleaved.astype(np.int64)
        return interleaved // self.params["num_fields"], interleaved % self.params["num_fields"]

    @property
    def bias(self) -> float:
        """b: the mean click probability over the calibration draw is TARGET_CLICK_RATE."""
        if self._bias is None:
            rest = np.concatenate([
                z for _, _, _, z, _ in self._chunks(_STREAMS["calibration"], _CALIBRATION_ROWS)
            ])
            low, high = -50.0, 50.0
            for _ in range(60):
                middle = 0.5 * (low + high)
                if _sigmoid(middle + rest).mean() < TARGET_CLICK_RATE:
                    low = middle
                else:
                    high = middle
            self._bias = 0.5 * (low + high)
        return self._bias

    def true_logits(self, split: str) -> np.ndarray:
        """float64 [rows]: the logit each row's label was drawn from (regenerates the split)."""
        rows = self.rows(split)
        bias = self.bias
        logits = np.empty(rows, dtype=np.float64)
        for start, _, _, rest, _ in self._chunks(_STREAMS[split], rows):
            logits[start:start + len(rest)] = bias + rest
        return logits

    def generate(self, split: str) -> CTRFrame:
        """One split's rows, generated chunk by chunk into preallocated arrays."""
        rows = self.rows(split)
        bias = self.bias
        frame = CTRFrame(
            np.empty((rows, len(self.fields)), dtype=np.int64),
            np.empty((rows, len(self.dense_names)), dtype=np.float32),
            np.empty(rows, dtype=np.float32),
        )
        for start, sparse, dense, rest, uniform in self._chunks(_STREAMS[split], rows):
            end = start + len(rest)
            frame.sparse[start:end] = sparse
            frame.dense[start:end] = dense
            frame.labels[start:end] = uniform < _sigmoid(bias + rest)
        return frame

    def load_ctr(self) -> CTRData:
        train, validation, test = (self.generate(split) for split in SPLITS)
        vocabulary = dict.fromkeys(self.fields, self.params["vocabulary_size"])
        return CTRData(self.fields, self.dense_names, train, validation, test, self.fingerprint(), vocabulary)

    def _chunks(
        self, stream: int, rows: int
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """(first row, raw IDs, dense, logit minus the bias, label uniforms) of each chunk of a stream."""
        p = self.params
        num_fields, dim = p["num_fields"], p["latent_dim"]
        for chunk, start in enumerate(range(0, rows, CHUNK_ROWS)):
            n = min(CHUNK_ROWS, rows - start)
            rng = np.random.default_rng([p["seed"], stream, chunk])
            indices = self.zipf.sample(rng.random((n, num_fields)))
            dense = rng.standard_normal((n, p["num_dense"]), dtype=np.float32)
            uniform = rng.random(n)
            sparse = np.empty((n, num_fields), dtype=np.int64)
            first_order = np.zeros(n)
            vector_sum = np.zeros((n, dim))
            squares = np.zeros(n)
            for field in range(num_fields):
                sparse[:, field] = self.raw_ids(indices[:, field], field)
                weights = hashed_normal(indices[:, field], 1 + dim, self.field_seeds[field])
                first_order += weights[:, 0]
                vectors = weights[:, 1:]
                vector_sum += vectors
                squares += np.einsum("nd,nd->n", vectors, vectors)
            pairwise = 0.5 * (np.einsum("nd,nd->n", vector_sum, vector_sum) - squares) / dim
            rest = self.first_order_scale * first_order + self.pairwise_scale * pairwise
            rest += dense.astype(np.float64) @ self.dense_weights
            yield start, sparse, dense, rest, uniform
