"""Fair tuning: a [tuning] table gives every point the same number of seeded trials, selected on validation only;
trials never evaluate the test split; the chosen configuration runs for every seed; a tuned sweep resumes."""

from __future__ import annotations

import math

import pytest

from embbench.errors import ConfigError
from embbench.report import write_report
from embbench.run.store import ResultStore
from embbench.run.suites import parse_suite, parse_suite_text, suite_toml
from embbench.run.sweep import load_suite, prepare, run_suite
from embbench.run.tuning import Dimension, propose, select, tuning_rounds

DATA = '[[datasets]]\nname = "synthetic"\nparams = { num_users = 150, num_items = 90, interactions_per_user = 6 }\n'
HEAD = 'epochs = 2\nbudgets = ["1/4"]\nlatency_batch_sizes = []\n' + DATA + '[[models]]\nname = "gmf"\n'
TUNING = '[tuning]\ntrials = 3\nseed = 5\nspace = { learning_rate = { low = 1e-4, high = 3e-2, log = true } }\n'


def write(tmp_path, body: str, name: str = "suite.toml"):
    path = tmp_path / name
    path.write_text(body)
    return path


@pytest.mark.parametrize(
    ("tuning", "message"),
    [
        ("[tuning]\ntrials = 0\n", "'trials' (per point) must be an integer in [1, 1000]"),
        ("[tuning]\ntrials = 2\nspace = { dim = { low = 8, high = 16 } }\n", "'dim' cannot be searched"),
        ("[tuning]\ntrials = 2\nspace = { learning_rat = { low = 0.1, high = 0.2 } }\n",
         "did you mean 'learning_rate'"),
        ("[tuning]\ntrials = 2\nspace = { learning_rate = { low = 0.0, high = 0.1, log = true } }\n",
         "a log scale needs low > 0"),
        ("[tuning]\ntrials = 2\nspace = { learning_rate = { low = 0.2, high = 0.1 } }\n", "'low' must be below 'high'"),
        ("[tuning]\ntrials = 2\nspace = { batch_size = { choices = [] } }\n", "'choices' must be a non-empty list"),
        ("[tuning]\ntrials = 2\nspace = { batch_size = { choices = [0, 8] } }\n", "must be in [1"),
        ("[tuning]\ntrials = 2\nmetric = \"val_auc\"\n", "unknown metric 'val_auc'"),
        ("[tuning]\ntrials = 2\nspaces = {}\n", "did you mean 'space'"),
    ],
)
def test_bad_tuning_tables_are_refused_with_one_line(tmp_path, tuning, message):
    path = write(tmp_path, HEAD + '[[schemes]]\nname = "hashing-trick"\n' + tuning)
    with pytest.raises(ConfigError) as raised:
        parse_suite(path)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_search_space_needs_a_tuning_table(tmp_path):
    body = HEAD + '[[schemes]]\nname = "dhe"\nsearch = { params = { num_hashes = { choices = [8, 16] } } }\n'
    with pytest.raises(ConfigError, match=r"no \[tuning\] table"):
        parse_suite(write(tmp_path, body))


def test_a_hyper_parameter_the_scheme_lacks_is_refused_before_anything_runs(tmp_path):
    body = HEAD + '[[schemes]]\nname = "dhe"\nsearch = { params = { num_hashez = { choices = [8, 16] } } }\n' + TUNING
    with pytest.raises(ConfigError, match="unknown parameter 'num_hashez'.*did you mean 'num_hashes'"):
        prepare(load_suite(write(tmp_path, body)))


def test_a_tuned_suite_writes_back_to_the_same_suite(tmp_path):
    body = HEAD + '[[schemes]]\nname = "dhe"\nsearch = { params = { num_hashes = { choices = [8, 16] } } }\n' + TUNING
    suite = parse_suite(write(tmp_path, body))
    again = parse_suite_text(suite_toml(suite), tmp_path / "suite.toml")
    assert again.tuning == suite.tuning
    assert again.schemes[0].search == suite.schemes[0].search


SPACE = (Dimension("learning_rate", 1e-4, 1e-1, log=True), Dimension("params.num_hashes", choices=(8, 16, 32)))


def test_proposals_are_deterministic_and_inside_the_space():
    history: list = []
    for trial in range(8):
        values = propose(SPACE, history, trial, seed=3, maximize=True, total_trials=8)
        assert values == propose(SPACE, list(history), trial, seed=3, maximize=True, total_trials=8)
        assert 1e-4 <= values["learning_rate"] <= 1e-1 and values["params.num_hashes"] in (8, 16, 32)
        history.append((values, 0.5 + 0.01 * trial if trial != 4 else None))  # trial 4 failed
    assert propose(SPACE, history, 8, seed=3, maximize=True, total_trials=9) != propose(
        SPACE, history, 8, seed=4, maximize=True, total_trials=9)


def test_trial_zero_is_the_default_configuration_when_the_space_holds_it():
    default = {"learning_rate": 1e-3, "params.num_hashes": 16}
    assert propose(SPACE, [], 0, seed=0, maximize=True, total_trials=4, default=default) == default
    outside = {"learning_rate": 1.0, "params.num_hashes": 16}
    assert propose(SPACE, [], 0, seed=0, maximize=True, total_trials=4, default=outside) != outside


def test_select_takes_the_best_validation_metric_the_earliest_of_equals():
    history = [({}, 0.7), ({}, None), ({}, 0.8), ({}, 0.8), ({}, math.nan)]
    assert select(history, maximize=True) == 2
    assert select([({}, 0.3), ({}, 0.2)], maximize=False) == 1
    assert select([({}, None)], maximize=True) is None


def test_the_chosen_trial_is_the_validation_best_even_where_the_test_best_differs(tmp_path):
    suite = load_suite(write(tmp_path, HEAD + '[[schemes]]\nname = "hashing-trick"\n' + TUNING))
    cells = prepare(suite).cells
    # Rows as a store would give them, with test metrics that disagree with validation (a trial row never has
    # test metrics; here they are planted to show that selection cannot see them).
    scores = {0: (0.60, 0.90), 1: (0.80, 0.50), 2: (0.70, 0.70)}
    trial_values = {}

    def stored(keys):
        rows = {}
        for key in keys:
            trial = len(trial_values)
            trial_values[trial] = key
            rows[key] = {"status": "ok", "val_auc": scores[trial][0], "test_auc": scores[trial][1]}
        return rows

    batches = list(tuning_rounds(suite, cells, stored, failures=[]))
    assert [len(batch) for batch in batches] == [1, 1, 1, 1]  # three trials, then the chosen configuration
    chosen = batches[-1][0]
    assert chosen.tuning["role"] == "selected" and chosen.tuning["trial"] == 1
    assert chosen.tuning["values"] == batches[1][0].tuning["values"]
    assert chosen.scheme.label == "hashing-trick (tuned)"


def test_a_tuned_sweep_gives_every_point_its_trials_tests_only_the_chosen_one_and_resumes(tmp_path):
    body = ("seeds = [0, 1]\n" + HEAD.replace('budgets = ["1/4"]', 'budgets = ["1/4", "1/2"]')
            + '[[schemes]]\nname = "hashing-trick"\n' + TUNING)
    path, db = write(tmp_path, body), tmp_path / "r.sqlite"
    summary = run_suite(str(path), db=db, progress=False)
    frame = ResultStore(db).frame()
    assert summary.failed == 0 and (frame["status"] == "ok").all()
    trials = frame[frame["tuning"] == "trial"]
    assert trials.groupby("budget").size().to_dict() == {"1/4": 3, "1/2": 3}  # the same trials per point
    assert trials["test_auc"].isna().all() and trials["test_hr10"].isna().all()  # test never evaluated
    assert trials["seed"].eq(0).all()
    selected = frame[frame["tuning"] == "selected"]
    assert len(selected) == 4 and set(selected["scheme_label"]) == {"hashing-trick (tuned)"}
    assert selected["test_auc"].notna().all()
    for budget, group in trials.groupby("budget"):
        best = group.sort_values(["val_auc", "trial"], ascending=[False, True]).iloc[0]
        chosen = selected[selected["budget"] == budget]
        assert set(chosen["trial"]) == {best["trial"]}
        first = chosen[chosen["seed"] == 0].iloc[0]
        assert first["val_auc"] == best["val_auc"]  # the same configuration and seed: the same run
    assert len(frame[frame["tuning"].isna()]) == 4  # the untuned cells, for tuned-vs-default
    again = run_suite(str(path), db=db, progress=False)
    assert again.ok == 0 and again.already_done == again.total == len(frame)
    text = write_report(frame, tmp_path / "report").read_text()
    tuning = text[text.index("## Tuning"):]
    assert "| hashing-trick | 1/4 | 3/3 |" in tuning and "| hashing-trick | 1/2 | 3/3 |" in tuning
    panels = text[: text.index("## Tuning")]
    assert "hashing-trick (tuned)" in panels  # tuned and default side by side; trials only in their section
    assert "[trial" not in panels


def test_a_searched_configuration_the_budget_cannot_hold_is_a_failed_trial_not_the_end_of_the_sweep(tmp_path):
    body = (
        'epochs = 1\nbudgets = ["1/5"]\nlatency_batch_sizes = []\n' + DATA + '[[models]]\nname = "gmf"\n'
        '[[schemes]]\nname = "compositional"\n'
        'search = { params = { num_partitions = { choices = [2, 8] }, '
        'operation = { choices = ["mult", "concat"] } } }\n'
        '[tuning]\ntrials = 4\n'
    )
    path, db = write(tmp_path, body), tmp_path / "r.sqlite"
    summary = run_suite(str(path), db=db, progress=False)
    frame = ResultStore(db).frame()
    failed = frame[frame["status"] == "failed"]
    assert len(failed) >= 1 and (failed["tuning"] == "trial").all()
    assert failed["error"].str.startswith("searched configuration cannot run:").all()
    assert summary.failed == len(failed) and summary.total == len(frame)
    assert (frame["tuning"] == "selected").sum() == 1  # the point still gets its chosen configuration
