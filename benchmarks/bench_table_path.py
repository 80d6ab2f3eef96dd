"""The table path against the kernels it wraps (see ``benchmarks/table_path.py``, which also runs as a script
and prints the throughput ratios): the ``full`` scheme at 10^6 x 32, batch 4096, through
``embbench.FeatureEmbeddings`` and through fbgemm's TBE / ``nn.EmbeddingBag(sparse=True)`` fed row indices; and a
6-table compositional model, whose batch is one fused kernel call."""

from __future__ import annotations

from embbench.collection import torchrec_available

from . import table_path
from .common import use_benchmark_threads

_PATHS = {
    "embbench fused rowwise-adagrad": lambda group: group[0][0],
    "raw TBE rowwise-adagrad": lambda group: group[0][1],
    "embbench sparse adam": lambda group: group[0][-2],
    "nn.EmbeddingBag sparse adam": lambda group: group[0][-1],
}


class FullTablePath:
    params = [list(_PATHS)]
    param_names = ["path"]

    def setup(self, path: str) -> None:
        use_benchmark_threads()
        if "rowwise" in path and not torchrec_available():
            raise NotImplementedError("fbgemm is not installed")
        self.path = _PATHS[path](table_path.full_paths(scattered=False, optimizers=("rowwise-adagrad",)))
        self.path.step()

    def time_train_step(self, path: str) -> None:
        """Forward, backward and table update of 4096 IDs."""
        self.path.step()

    def time_forward(self, path: str) -> None:
        """Look-up of 4096 IDs, no autograd."""
        self.path.forward()


class MultiTablePath:
    """compositional, 3 partitions, on two features: 6 tables in one fused kernel call per batch."""

    params = [["embbench fused", "raw TBE"]]
    param_names = ["path"]

    def setup(self, path: str) -> None:
        use_benchmark_threads()
        if not torchrec_available():
            raise NotImplementedError("fbgemm is not installed")
        paths, _ = table_path.multi_table_paths()
        self.path = paths[0 if path == "embbench fused" else 1]
        self.path.step()

    def time_train_step(self, path: str) -> None:
        self.path.step()

    def time_forward(self, path: str) -> None:
        self.path.forward()
