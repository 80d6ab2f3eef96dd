"""Quantised tables: outputs close to fp32 (fp16 tight, int8 loose, int4 looser), sizes from the quantised
state and about 2x/4x/8x smaller, and the runner's extra row per precision sharing one training run."""

from __future__ import annotations

import json

import pytest
import torch

from embbench import Budget, ConfigError, EmbeddingTable, FeatureSpec, build_embedding, state_size_bytes
from embbench.quantization import (
    QuantizationUnavailable,
    QuantizedEmbeddingTable,
    embedding_tables,
    expected_row_bytes,
    quantize_tables,
    quantized_size_bytes,
)
from embbench.registry import create_scheme
from embbench.runner import run_suite
from embbench.store import ResultStore
from embbench.suites import parse_suite
from embbench.tables import table_backend

needs_torchrec = pytest.mark.skipif(table_backend() != "torchrec", reason="quantised tables need torchrec tables")

FEATURE = FeatureSpec.from_vocabulary("item", 5000, 32)
# Largest |quantised - fp32| of one row relative to the row's value range, per precision (int8/int4 round to
# 1/255 and 1/15 of the range, plus fp16 scale and bias).
TOLERANCE = {"fp16": 1e-3, "int8": 1 / 255, "int4": 1 / 15}


def build(name: str, budget: str = "1/4", feature: FeatureSpec = FEATURE):
    budget_bytes = Budget.parse(budget).resolve(feature.num_ids, feature.dim)
    module, _ = build_embedding(create_scheme(name), name, feature, budget_bytes, seed=0)
    return module.eval()


def spread_rows(module: torch.nn.Module) -> None:
    """Trained-like rows: unit-scale values, so that errors are not hidden by the tiny initial weights."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for table in embedding_tables(module):
            table.weight.copy_(torch.randn(table.weight.shape, generator=generator))


@needs_torchrec
@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_quantised_table_output_is_close_to_fp32(precision):
    table = EmbeddingTable(1000, 32, seed=0)
    spread_rows(table)
    ids = torch.randint(0, 1000, (500,), generator=torch.Generator().manual_seed(1))
    quantized = quantize_tables(table, precision)
    assert isinstance(quantized, QuantizedEmbeddingTable)
    with torch.no_grad():
        expected, got = table(ids), quantized(ids)
    row_range = table.weight[ids].amax(dim=1) - table.weight[ids].amin(dim=1)
    error = (got - expected).abs().amax(dim=1)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (error <= TOLERANCE[precision] * row_range + 1e-6).all()
    assert error.max() > 0  # it really is quantised


@needs_torchrec
def test_a_strided_view_of_indices_is_read_as_its_values():
    table = EmbeddingTable(300, 8, seed=0)
    spread_rows(table)
    quantized = quantize_tables(table, "fp16")
    columns = torch.randint(0, 300, (50, 3), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(quantized(columns[:, 1]), quantized(columns[:, 1].clone()), rtol=0, atol=0)


@needs_torchrec
@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_weighted_bags_of_quantised_rows_match_fp32(precision):
    table = EmbeddingTable(200, 16, seed=0, weighted=True)
    spread_rows(table)
    ids = torch.randint(0, 200, (64, 3), generator=torch.Generator().manual_seed(2))
    weights = torch.rand(64, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = table(ids, weights), quantize_tables(table, precision)(ids, weights)
    torch.testing.assert_close(got, expected, rtol=0, atol=3 * TOLERANCE[precision] * 6)


@needs_torchrec
@pytest.mark.parametrize("precision, factor", [("fp16", 2.0), ("int8", 32 * 4 / 36), ("int4", 32 * 4 / 20)])
def test_quantised_size_is_the_quantised_state_and_about_the_expected_factor_smaller(precision, factor):
    table = EmbeddingTable(1000, 32, seed=0)
    quantized = quantize_tables(table, precision)
    size = quantized_size_bytes(quantized)
    assert size == 1000 * expected_row_bytes(32, precision)
    assert state_size_bytes(table) / size == pytest.approx(factor)
    stored = quantized.state_dict()
    assert len(stored) == 1 and next(iter(stored.values())).view(torch.uint8).numel() == size


@needs_torchrec
@pytest.mark.parametrize("name", ["full", "hashing-trick", "multi-hashing", "hash-embedding"])
def test_a_schemes_tables_are_quantised_and_its_other_state_kept(name):
    module = build(name, "1" if name == "full" else "1/4")
    spread_rows(module)
    tables = embedding_tables(module)
    quantized = quantize_tables(module, "int8")
    assert not embedding_tables(quantized) and embedding_tables(module) == tables  # the original is untouched
    table_bytes = sum(state_size_bytes(table) for table in tables)
    quantized_table_bytes = sum(
        table.num_rows * expected_row_bytes(table.dim, "int8") for table in tables
    )
    assert quantized_size_bytes(quantized) == state_size_bytes(module) - table_bytes + quantized_table_bytes
    ids = torch.arange(-5, 6000, 13)
    with torch.no_grad():
        torch.testing.assert_close(quantized(ids), module(ids), rtol=0, atol=0.1)


def test_quantised_size_equals_state_size_for_plain_modules():
    module = build("dhe")
    assert quantized_size_bytes(module) == state_size_bytes(module)


def test_a_scheme_without_tables_cannot_be_quantised():
    with pytest.raises(QuantizationUnavailable, match="no embedding tables to quantise"):
        quantize_tables(build("dhe"), "int8")


@needs_torchrec
def test_odd_row_widths_are_refused_for_packed_precisions_with_the_reason():
    table = EmbeddingTable(10, 6, seed=0)
    assert quantized_size_bytes(quantize_tables(table, "int8")) == 10 * (6 + 4)
    with pytest.raises(QuantizationUnavailable, match="int4 rows need a dimension divisible by 4"):
        quantize_tables(table, "int4")


def test_torch_backend_tables_are_refused_with_the_reason(monkeypatch):
    monkeypatch.setenv("EMBBENCH_TABLE_BACKEND", "torch")
    table = EmbeddingTable(10, 8, seed=0)
    with pytest.raises(QuantizationUnavailable, match="torch' backend"):
        quantize_tables(table, "fp16")


def test_fp32_is_a_plain_copy():
    table = EmbeddingTable(10, 8, seed=0)
    copied = quantize_tables(table, "fp32")
    assert copied is not table and torch.equal(copied.weight, table.weight)


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
