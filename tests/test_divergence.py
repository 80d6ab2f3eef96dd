"""A run whose loss, scores or metrics stop being numbers gives no result: it is stored as failed, says where it
diverged, keeps the epochs that finished as valid JSON, and runs again next time."""

from __future__ import annotations

import json
import math
import sqlite3

import pytest
import torch

from embbench import Diverged, TrainConfig, require_finite_scores
from embbench.metrics import require_finite_metrics
from embbench.run.store import ResultStore
from embbench.run.sweep import run_suite
from embbench.training import fit

DATA = '[[datasets]]\nname = "synthetic"\nparams = { num_users = 150, num_items = 90, interactions_per_user = 6 }\n'
CTR_DATA = (
    '[[datasets]]\nname = "synthetic-ctr"\n'
    "params = { num_fields = 3, vocabulary_size = 500, train_rows = 2000, validation_rows = 300, test_rows = 300 }\n"
)


class ScriptedStep:
    """A training step whose losses are given: ``losses[epoch - 1][batch]``."""

    device = torch.device("cpu")

    def __init__(self, losses: list[list[float]]) -> None:
        self.losses = [list(epoch) for epoch in losses]
        self.epoch = -1

    def __call__(self, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> float:
        return self.losses[self.epoch].pop(0)

    def state(self) -> dict:
        return {}

    def restore(self, state: dict) -> None:
        pass


def scripted_fit(losses: list[list[float]], metrics: list[dict[str, float]] | None = None, epochs: int = 3):
    step = ScriptedStep(losses)
    evaluations = iter(metrics or [{"auc": 0.7, "hr@10": 0.1}] * 10)

    def epoch_rows(generator: torch.Generator):
        step.epoch += 1
        return (torch.zeros(4, 1),), torch.zeros(4)

    def evaluate(split: str) -> dict[str, float]:  # the scripted metrics are validation's; test (after epoch 1
        return next(evaluations) if split == "validation" else {"auc": 0.7, "hr@10": 0.1}  # and at the end) fixed

    config = TrainConfig(epochs=epochs, batch_size=2, patience=epochs)
    return fit(torch.nn.Linear(1, 1), epoch_rows, evaluate, config, 0, step)


def test_a_nan_loss_stops_training_with_the_epoch_and_the_last_finite_loss():
    with pytest.raises(Diverged) as caught:
        scripted_fit([[0.7, 0.6], [0.5, math.nan], [0.4, 0.3]])
    error = caught.value
    assert error.epoch == 2 and error.last_finite_loss == 0.5
    assert [entry["epoch"] for entry in error.history] == [1]  # the epoch that finished
    assert str(error) == "diverged: the training loss of batch 2 is nan at epoch 2; last finite training loss 0.5"


@pytest.mark.parametrize("loss", [math.inf, -math.inf])
def test_an_infinite_loss_is_divergence_too(loss):
    with pytest.raises(Diverged, match=f"is {loss} at epoch 1"):
        scripted_fit([[loss, 0.1]])


def test_a_non_finite_metric_is_no_result():
    metrics = [{"auc": 0.7, "hr@10": 0.1}, {"auc": math.nan, "hr@10": 0.1}]
    with pytest.raises(Diverged, match="validation auc is nan at epoch 2; last finite training loss 0.2"):
        scripted_fit([[0.5, 0.4], [0.3, 0.2], [0.1, 0.1]], metrics)


def test_finite_training_gives_its_result():
    result = scripted_fit([[0.5, 0.4], [0.3, 0.2]], epochs=2)
    assert result.best_epoch == 1 and len(result.history) == 2 and result.test == {"auc": 0.7, "hr@10": 0.1}


def test_non_finite_scores_are_refused_before_any_metric():
    require_finite_scores(torch.tensor([0.1, -3.0]), "test")
    with pytest.raises(Diverged, match="2 of 3 model scores on the test split are NaN or infinite"):
        require_finite_scores(torch.tensor([0.1, math.nan, math.inf]), "test")
    assert require_finite_metrics({"auc": 0.5}, "test") == {"auc": 0.5}
    with pytest.raises(Diverged, match="test logloss is inf"):
        require_finite_metrics({"auc": 0.5, "logloss": math.inf}, "test")


def test_history_with_non_finite_values_is_stored_as_strict_json(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    labels = dict.fromkeys(("suite", "dataset", "model", "scheme", "scheme_label", "budget", "device"), "x")
    store.write({**labels, "cell_key": "k", "seed": 0, "status": "failed", "config_json": {"lr": math.inf},
                 "history_json": [{"epoch": 1, "loss": math.nan, "val_auc": math.inf}]})
    with sqlite3.connect(tmp_path / "r.sqlite") as connection:
        (text,) = connection.execute("SELECT history_json FROM cells").fetchone()
    assert json.loads(text, parse_constant=lambda word: pytest.fail(f"not JSON: {word}")) == [
        {"epoch": 1, "loss": None, "val_auc": None}
    ]


# The largest learning rates a suite accepts: DLRM's loss turns NaN within the first epoch; GMF's loss stays
# finite under SGD at 10^6 while its weights overflow, so the validation scores are what give it away.
@pytest.mark.parametrize(
    ("task", "data", "settings", "what"),
    [
        ("ctr", CTR_DATA, "", "the training loss of batch"),
        ("ranking", DATA, 'embedding_optimizers = ["sgd"]\nembedding_learning_rate = 1e6\n', "model scores"),
    ],
)
def test_a_diverging_cell_is_stored_failed_with_valid_json_and_runs_again(tmp_path, task, data, settings, what):
    model = "gmf" if task == "ranking" else "dlrm"
    body = (f'task = "{task}"\nepochs = 2\nlearning_rate = 1e6\n{settings}budgets = ["1/4"]\n' + data
            + f'[[models]]\nname = "{model}"\n[[schemes]]\nname = "hashing-trick"\n')
    path = tmp_path / "suite.toml"
    path.write_text(body)
    summary = run_suite(str(path), db=tmp_path / "r.sqlite", progress=False)
    assert (summary.ok, summary.failed) == (0, 1)
    row = ResultStore(tmp_path / "r.sqlite").frame().iloc[0]
    assert row["status"] == "failed" and row["error"].startswith("diverged: ") and what in row["error"]
    assert "\n" not in row["error"] and "Traceback" not in row["error"]
    for column in ("test_auc", "val_auc", "test_logloss"):
        assert column not in row or row[column] is None or math.isnan(row[column])
    with sqlite3.connect(tmp_path / "r.sqlite") as connection:
        (history,) = connection.execute("SELECT history_json FROM cells").fetchone()
    assert isinstance(json.loads(history, parse_constant=lambda word: pytest.fail(word)), list)
    again = run_suite(str(path), db=tmp_path / "r.sqlite", progress=False)
    assert again.failed == 1  # a failed cell is not finished: it runs again


def test_a_failed_row_never_replaces_an_ok_one(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    labels = dict.fromkeys(("suite", "dataset", "model", "scheme", "scheme_label", "budget", "device"), "x")
    base = {**labels, "cell_key": "k", "seed": 0, "config_json": {}}
    store.write({**base, "status": "failed", "error": "first try"})
    store.write({**base, "status": "ok", "test_auc": 0.75})
    store.write({**base, "status": "failed", "error": "diverged: a rerun"})  # kept out: the ok row stays
    rows = store.frame()
    assert len(rows) == 1 and rows.iloc[0]["status"] == "ok" and rows.iloc[0]["test_auc"] == 0.75
    store.write({**base, "status": "ok", "test_auc": 0.8})  # an ok row replaces an ok one, whole
    row = store.frame().iloc[0]
    assert row["test_auc"] == 0.8 and (row["error"] is None or row["error"] != row["error"])
