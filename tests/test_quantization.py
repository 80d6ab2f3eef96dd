"""Quantised tables: outputs close to fp32 (fp16 tight, int8 loose, int4 looser), sizes from the quantised
state and about 2x/4x/8x smaller, and the runner's extra row per precision sharing one training run."""

from __future__ import annotations

import json

import pytest
import torch

from embbench import (
    Budget,
    ConfigError,
    EmbeddingTable,
    FeatureEmbeddings,
    FeatureSpec,
    Lookup,
    TableBackedEmbedding,
    TableTraining,
    build_embedding,
    state_size_bytes,
)
from embbench.collection import torchrec_available
from embbench.measure.quantization import QuantizationUnavailable, quantize_model, quantized_feature_bytes
from embbench.registry import create_scheme
from embbench.run.store import ResultStore
from embbench.run.suites import parse_suite
from embbench.run.sweep import run_suite

needs_torchrec = pytest.mark.skipif(not torchrec_available(), reason="quantised tables need torchrec")

FEATURE = FeatureSpec.from_vocabulary("item", 5000, 32)
# Largest |quantised - fp32| of one row relative to the row's value range, per precision (int8/int4 round to
# 1/255 and 1/15 of the range, plus fp16 scale and bias).
TOLERANCE = {"fp16": 1e-3, "int8": 1 / 255, "int4": 1 / 15}


def row_bytes(dim: int, precision: str) -> int:
    """Bytes of one quantised row on a CPU: packed values, plus the fp16 scale and bias of int8/int4 rows."""
    values = dim * {"fp16": 16, "int8": 8, "int4": 4}[precision] // 8
    return values + (4 if precision in ("int8", "int4") else 0)


class OneTable(TableBackedEmbedding):
    """A table read as given: ids [N] or [N, k] (summed), optionally weighted."""

    def __init__(self, rows: int, dim: int, weighted: bool = False) -> None:
        super().__init__()
        self.table = EmbeddingTable(rows, dim, seed=0, weighted=weighted)
        self.weights: torch.Tensor | None = None

    def lookups(self, ids: torch.Tensor) -> list[Lookup]:
        return [self.table.lookup(ids, weights=self.weights)]

    def combine(self, ids: torch.Tensor, pooled: list[torch.Tensor]) -> torch.Tensor:
        return pooled[0]


def in_collection(module: torch.nn.Module, backend: str = "torch") -> FeatureEmbeddings:
    optimizer = "sgd" if backend == "torchrec" else "adam"
    return FeatureEmbeddings({"f": module}, TableTraining(backend, optimizer)).eval()


def build(name: str, budget: str = "1/4", feature: FeatureSpec = FEATURE):
    budget_bytes = Budget.parse(budget).resolve(feature.num_ids, feature.dim)
    module, _ = build_embedding(create_scheme(name), name, feature, budget_bytes, seed=0)
    return module.eval()


def spread_rows(embeddings: FeatureEmbeddings) -> None:
    """Trained-like rows: unit-scale values, so that errors are not hidden by the tiny initial weights."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key in embeddings.tables.table_keys:
            weight = embeddings.tables.weight(key)
            weight.copy_(torch.randn(weight.shape, generator=generator))


@needs_torchrec
@pytest.mark.parametrize("backend", ["torch", "torchrec"])
@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_quantised_rows_are_close_to_fp32(precision, backend):
    embeddings = in_collection(OneTable(1000, 32), backend)
    spread_rows(embeddings)
    ids = torch.randint(0, 1000, (500,), generator=torch.Generator().manual_seed(1))
    quantized = quantize_model(embeddings, precision)
    with torch.no_grad():
        expected, got = embeddings.embed("f", ids), quantized.embed("f", ids)
    weight = embeddings.tables.weight("f__table")
    row_range = weight[ids].amax(dim=1) - weight[ids].amin(dim=1)
    error = (got - expected).abs().amax(dim=1)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (error <= TOLERANCE[precision] * row_range + 1e-6).all()
    assert error.max() > 0  # it really is quantised
    assert quantized.tables.kernel == "quantized" and embeddings.tables.kernel != "quantized"  # a copy


@needs_torchrec
def test_a_strided_view_of_indices_is_read_as_its_values():
    embeddings = in_collection(OneTable(300, 8))
    spread_rows(embeddings)
    quantized = quantize_model(embeddings, "fp16")
    columns = torch.randint(0, 300, (50, 3), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(
            quantized.embed("f", columns[:, 1]), quantized.embed("f", columns[:, 1].clone()), rtol=0, atol=0
        )


@needs_torchrec
@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_weighted_bags_of_quantised_rows_match_fp32(precision):
    module = OneTable(200, 16, weighted=True)
    embeddings = in_collection(module)
    spread_rows(embeddings)
    ids = torch.randint(0, 200, (64, 3), generator=torch.Generator().manual_seed(2))
    module.weights = torch.rand(64, 3, generator=torch.Generator().manual_seed(3))
    quantized = quantize_model(embeddings, precision)
    quantized.features["f"].weights = module.weights
    with torch.no_grad():
        expected = embeddings.forward({"f": ids})["f"]
        got = quantized.forward({"f": ids})["f"]
    torch.testing.assert_close(got, expected, rtol=0, atol=3 * TOLERANCE[precision] * 6)


@needs_torchrec
@pytest.mark.parametrize("precision, factor", [("fp16", 2.0), ("int8", 32 * 4 / 36), ("int4", 32 * 4 / 20)])
def test_quantised_size_is_the_quantised_state_and_about_the_expected_factor_smaller(precision, factor):
    module = OneTable(1000, 32)
    fp32_bytes = state_size_bytes(module)
    quantized = quantize_model(in_collection(module), precision)
    size = quantized_feature_bytes(quantized)["f"]
    assert size == 1000 * row_bytes(32, precision)
    assert fp32_bytes / size == pytest.approx(factor)
    stored = [t for name, t in quantized.tables.stores[0].ebc.state_dict().items() if name.startswith("embedding_bags")]
    assert sum(getattr(t, "elem", t).view(torch.uint8).numel() for t in stored) == size


@needs_torchrec
@pytest.mark.parametrize("name", ["full", "hashing-trick", "multi-hashing", "hash-embedding"])
def test_a_schemes_tables_are_quantised_and_its_other_state_kept(name):
    module = build(name, "1" if name == "full" else "1/4")
    fp32_bytes = state_size_bytes(module)
    tables = module.embedding_tables()
    table_bytes = sum(state_size_bytes(table) for table in tables)
    embeddings = in_collection(module)
    spread_rows(embeddings)
    quantized = quantize_model(embeddings, "int8")
    quantized_table_bytes = sum(table.num_rows * row_bytes(table.dim, "int8") for table in tables)
    assert quantized_feature_bytes(quantized)["f"] == fp32_bytes - table_bytes + quantized_table_bytes
    assert quantized_feature_bytes(embeddings)["f"] == fp32_bytes  # the original is untouched
    ids = torch.arange(-5, 6000, 13)
    with torch.no_grad():
        torch.testing.assert_close(quantized.embed("f", ids), embeddings.embed("f", ids), rtol=0, atol=0.1)


def test_feature_bytes_equal_state_size_for_modules_without_tables():
    module = build("dhe")
    assert quantized_feature_bytes(FeatureEmbeddings({"f": module}))["f"] == state_size_bytes(module)


def test_a_scheme_without_tables_cannot_be_quantised():
    with pytest.raises(QuantizationUnavailable, match="no embedding tables to quantise"):
        quantize_model(in_collection(build("dhe")), "int8")


@pytest.mark.parametrize("name", ["qat", "magnitude-pruning", "pep", "dpq", "mgqe"])
def test_schemes_storing_their_own_compressed_form_refuse_post_training_quantisation(name):
    # Their tables are training state (an fp32 shadow, a query table), not what they store.
    with pytest.raises(QuantizationUnavailable, match="stores its own compressed form"):
        quantize_model(in_collection(build(name, "1/4", FeatureSpec.from_vocabulary("item", 500, 32))), "int8")


@needs_torchrec
def test_odd_row_widths_are_refused_for_packed_precisions_with_the_reason():
    embeddings = in_collection(OneTable(10, 6))
    assert quantized_feature_bytes(quantize_model(embeddings, "int8"))["f"] == 10 * (6 + 4)
    with pytest.raises(QuantizationUnavailable, match="int4 rows need a dimension divisible by 4"):
        quantize_model(embeddings, "int4")


def test_fp32_is_a_plain_copy():
    embeddings = in_collection(OneTable(10, 8))
    copied = quantize_model(embeddings, "fp32")
    ids = torch.arange(10)
    assert copied is not embeddings and torch.equal(copied.embed("f", ids), embeddings.embed("f", ids))


DATA = '[[datasets]]\nname = "synthetic"\nparams = { num_users = 150, num_items = 90, interactions_per_user = 6 }\n'
MODEL = '[[models]]\nname = "gmf"\n'


def suite(tmp_path, body: str):
    path = tmp_path / "suite.toml"
    path.write_text('epochs = 1\nbudgets = ["1/4"]\nlatency_batch_sizes = []\n' + body + DATA + MODEL)
    return path


def test_precisions_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="unknown precision 'int3'"):
        parse_suite(suite(tmp_path, 'precisions = ["fp32", "int3"]\n[[schemes]]\nname = "full"\n'))
    with pytest.raises(ConfigError, match="twice"):
        parse_suite(suite(tmp_path, 'precisions = ["int8", "int8"]\n[[schemes]]\nname = "full"\n'))


def test_fp32_cells_keep_their_keys_and_other_precisions_get_their_own(tmp_path):
    plain = parse_suite(suite(tmp_path, '[[schemes]]\nname = "hashing-trick"\n')).cells()
    swept = parse_suite(suite(tmp_path, 'precisions = ["fp32", "int8"]\n[[schemes]]\nname = "hashing-trick"\n'))
    fp32, int8 = swept.cells()
    assert [cell.key for cell in plain] == [fp32.key]
    assert int8.key != fp32.key and int8.trained == fp32 and int8.label == "hashing-trick (int8)"


@needs_torchrec
def test_runner_writes_a_row_per_precision_from_one_training_run_and_resumes(tmp_path):
    body = (
        'precisions = ["fp32", "int8"]\n[[schemes]]\nname = "hashing-trick"\n'
        '[[schemes]]\nname = "dhe"\nparams = { num_hashes = 16 }\n'
    )
    path, db = suite(tmp_path, body), tmp_path / "r.sqlite"
    first = run_suite(str(path), db=db, progress=False)
    assert (first.total, first.ok, first.skipped, first.failed) == (4, 3, 1, 0)
    frame = ResultStore(db).frame().set_index("scheme_label")
    fp32, int8 = frame.loc["hashing-trick"], frame.loc["hashing-trick (int8)"]
    assert fp32["cell_key"] != int8["cell_key"]
    assert (fp32["precision"], int8["precision"], int8["status"]) == ("fp32", "int8", "ok")
    assert int8["size_bytes"] < fp32["size_bytes"] / 3
    assert int8["train_seconds"] == fp32["train_seconds"] and int8["history_json"] == fp32["history_json"]
    assert 0 <= int8["test_auc"] <= 1 and abs(int8["test_auc"] - fp32["test_auc"]) < 0.05
    dhe_int8 = frame.loc["dhe (int8)"]
    assert dhe_int8["status"] == "skipped" and dhe_int8["error"] == "no embedding tables to quantise"
    again = run_suite(str(path), db=db, progress=False)
    assert (again.already_done, again.ok, again.skipped) == (4, 0, 0)


@needs_torchrec
def test_adding_a_precision_later_runs_only_its_rows_from_an_identical_retraining(tmp_path):
    scheme = '[[schemes]]\nname = "hashing-trick"\n'
    db = tmp_path / "r.sqlite"
    run_suite(str(suite(tmp_path, scheme)), db=db, progress=False)
    stamp = ResultStore(db).frame()["finished_at"].tolist()
    summary = run_suite(str(suite(tmp_path, 'precisions = ["fp32", "fp16"]\n' + scheme)), db=db, progress=False)
    assert (summary.already_done, summary.ok) == (1, 1)
    frame = ResultStore(db).frame().set_index("scheme_label")
    assert frame.loc[["hashing-trick"], "finished_at"].tolist() == stamp
    histories = [json.loads(frame.loc[label, "history_json"]) for label in ("hashing-trick", "hashing-trick (fp16)")]
    for history in histories:
        for epoch in history:
            epoch.pop("train_seconds")
    assert histories[0] == histories[1]  # the same training, run again
    assert abs(frame.loc["hashing-trick (fp16)", "test_auc"] - frame.loc["hashing-trick", "test_auc"]) < 1e-3
