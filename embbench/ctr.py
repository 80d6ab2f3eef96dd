"""The click-through data API: rows of categorical fields, dense features and a 0/1 label, already split.

A CTR dataset plugin subclasses :class:`CTRDataset` and returns :class:`CTRData` from ``load_ctr``: for each of
train, validation and test, an int64 matrix of raw categorical IDs (one column per field), a float32 matrix of
dense features (possibly with no columns) and float32 labels. Categorical values that are strings are mapped
to int64 IDs with :func:`hash_strings` (a fixed-key hash, equal on every machine); a field's missing value is
an ID like any other. ``vocabulary_sizes`` gives a field's declared cardinality where the dataset knows it (a
generator's vocabulary); otherwise a field's vocabulary is the set of IDs seen in training.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from embbench.data import Dataset
from embbench.errors import ConfigError, PluginError

SPLITS = ("train", "validation", "test")


@dataclass
class CTRFrame:
    """One split: ``sparse`` int64 [N, F] raw IDs, ``dense`` float32 [N, D], ``labels`` float32 [N] of 0/1."""

    sparse: np.ndarray
    dense: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class CTRData:
    """A CTR dataset's splits; ``fields`` name the sparse columns, ``dense_names`` the dense ones."""

    fields: tuple[str, ...]
    dense_names: tuple[str, ...]
    train: CTRFrame
    validation: CTRFrame
    test: CTRFrame
    fingerprint: str
    vocabulary_sizes: dict[str, int] = field(default_factory=dict)  # declared cardinalities, where known

    def frame(self, which: str) -> CTRFrame:
        if which not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got '{which}'")
        return getattr(self, which)

    def summary(self) -> dict[str, int]:
        return {
            "fields": len(self.fields),
            "dense_features": len(self.dense_names),
            **{f"{name}_rows": len(self.frame(name)) for name in SPLITS},
            "train_positives": int(self.train.labels.sum()),
        }

    def validate(self, where: str) -> None:
        """Shapes and dtypes as documented; a PluginError naming the dataset otherwise."""
        if len(set(self.fields)) != len(self.fields) or not self.fields:
            raise PluginError(f"{where}: CTR fields must be distinct and at least one, got {self.fields}")
        for name in SPLITS:
            frame = self.frame(name)
            rows = len(frame.labels)
            checks = (
                (frame.sparse.dtype == np.int64 and frame.sparse.shape == (rows, len(self.fields)), "sparse"),
                (frame.dense.dtype == np.float32 and frame.dense.shape == (rows, len(self.dense_names)), "dense"),
                (frame.labels.dtype == np.float32 and frame.labels.ndim == 1, "labels"),
            )
            for ok, what in checks:
                if not ok:
                    raise PluginError(f"{where}: {name} {what} has the wrong dtype or shape")
            if rows == 0:
                raise PluginError(f"{where}: the {name} split has no rows")
            if not np.isin(frame.labels, (0.0, 1.0)).all():
                raise PluginError(f"{where}: {name} labels must be 0 or 1")
        unknown = set(self.vocabulary_sizes) - set(self.fields)
        if unknown:
            raise PluginError(f"{where}: vocabulary_sizes names unknown fields {sorted(unknown)}")


class CTRDataset(Dataset):
    """Base class of click-through dataset plugins (task ``ctr``)."""

    @abstractmethod
    def load_ctr(self) -> CTRData:
        """The dataset's train, validation and test rows."""

    def load(self) -> pd.DataFrame:
        raise ConfigError(
            f"{type(self).__name__} is a click-through dataset (fields, dense features, labels), not user-item "
            "interactions; use it with task = \"ctr\""
        )


def hash_strings(values: Sequence[str] | np.ndarray | pd.Series) -> np.ndarray:
    """Stable int64 IDs of string values (pandas' fixed-key SipHash; equal on every machine and run)."""
    array = np.asarray(values, dtype=object)
    return pd.util.hash_array(array, categorize=True).view(np.int64)
