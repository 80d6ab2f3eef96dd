"""Fuzzing `embbench run suite` with mutated shipped suites (a seeded generator, so every CI run tries the same
cases and a failure names the case to reproduce).

Every outcome is held to the contract: exit 0 with every cell stored ok or skipped, or exit 2 with one
`error:` line and no database. A traceback, another exit code, a failed cell (a suite that passed validation
and then broke in training) or a database left behind by a refusal fails the test.

Each case starts from a shipped suite made cheap (one tiny dataset of its task, one model, one or two
schemes, one epoch, one seed, a small latency batch) and mutates it: a setting, a `[quick]` key, an entry's
name, label, budgets or parameters set to a hostile or a valid other value or removed, an unknown key
added, or the file's bytes flipped, cut or made non-UTF-8. Cases whose mutation made a valid suite expensive
(more cells or epochs, a larger dimension, smaller batches) are validated but not trained; they do not count
towards the cases.
"""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path
from typing import Any

import pytest
import tomllib
from click.testing import CliRunner

from embbench import list_datasets, list_models, list_schemes
from embbench.cli import main
from embbench.errors import EmbbenchError
from embbench.run.settings import BY_NAME, ENTRY_SECTIONS, toml_key, toml_value
from embbench.run.store import ResultStore
from embbench.run.suites import builtin_suites, parse_suite

CASES = int(__import__("os").environ.get("EMBBENCH_FUZZ_CASES", 520))
SEED = 20261201
CHEAP_DATA = {
    "ranking": {"name": "synthetic", "params": {"num_users": 200, "num_items": 150, "interactions_per_user": 4}},
    "ctr": {"name": "synthetic-ctr", "params": {"num_fields": 2, "vocabulary_size": 200, "train_rows": 300,
                                                "validation_rows": 100, "test_rows": 100}},
}
CHEAP_MODEL = {"ranking": "gmf", "ctr": "dlrm"}
#: schemes slow on any data: kept out of the cheap bases (their parameters are fuzzed by name swaps only)
SLOW_SCHEMES = {"tt-rec", "cce"}
HOSTILE = [
    0, -1, 1, 3, 2**31, 2**63 - 1, 2**70, -(2**63), 1.5, -0.5, 0.0, 1e308, math.nan, math.inf, -math.inf, True,
    False, "", "x", "1/4", "0.5", "64MB", "1.2.3MB", ".MB", "9" * 400, "1e400", "0", "-1", "2", "cuda", "auto",
    "é☃", "a" * 300, [], [0], [0, 0], ["1/2", "0.5"], [[1]], [1.5], ["a"], {}, {"x": 1},
]
UNKNOWN_KEYS = ["foo", "Epochs", "budget", "seed", "quick_", "datasets_"]


def cheap_base(path: Path, rng: random.Random) -> dict[str, Any]:
    """A shipped suite cut down to run in a second or two (at budget 1, where every scheme fits tiny data)."""
    raw = tomllib.loads(path.read_text())
    task = raw.get("task", "ranking")
    if task not in CHEAP_DATA:  # rating-classification needs real ratings: its suites are fuzzed as ranking
        task = "ranking"
    raw["task"] = task
    raw.update(epochs=1, seeds=[0], latency_batch_sizes=[], dim=16, batch_size=256, patience=1, budgets=["1"])
    raw.pop("quick", None)
    raw.pop("references", None)  # they name the suite's own schemes and budgets, which a cheap base replaces
    # Budget 1 fits every scheme only shared in proportion: split equally, the larger feature gets less than its
    # full table (half of both tables' sum), so the full scheme does not fit.
    raw.pop("budget_split", None)
    raw["datasets"] = [copy.deepcopy(CHEAP_DATA[task])]
    raw["models"] = [{"name": CHEAP_MODEL[task]}]
    schemes = [entry for entry in raw.get("schemes", []) if entry.get("name") not in SLOW_SCHEMES]
    raw["schemes"] = rng.sample(schemes, min(len(schemes), rng.choice([1, 2]))) or [{"name": "hashing-trick"}]
    for entry in raw["schemes"]:
        entry.pop("budgets", None)
    for axis in ("shardings", "embedding_optimizers", "precisions", "devices", "backends"):
        if axis in raw:
            raw[axis] = raw[axis][:1]
    if raw.get("shardings", ["auto"]) != ["auto"]:
        raw["shardings"] = ["auto"]
    return raw


def valid_values(key: str) -> list[Any]:
    setting = BY_NAME.get(key)
    if setting is None:
        return []
    if setting.choices:
        choices = list(setting.choices)
        return [[choice] for choice in choices] if setting.is_list else choices
    return {"budgets": [["1/2"], ["1/8"], ["64KB"], ["1"]], "learning_rate": [0.01, 1e-4], "weight_decay": [0.1],
            "num_negatives": [1, 2], "embedding_learning_rate": [0.05]}.get(key, [])


def mutate(raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    choice = rng.random()
    if choice < 0.35:  # a top-level setting: hostile, valid other, removed, or unknown
        key = rng.choice([*BY_NAME, *UNKNOWN_KEYS])
        valid = valid_values(key)
        roll = rng.random()
        if valid and roll < 0.4:
            raw[key] = rng.choice(valid)
        elif roll < 0.85:
            raw[key] = rng.choice(HOSTILE)
        else:
            raw.pop(key, None)
    elif choice < 0.45:  # a [quick] profile
        key = rng.choice([*BY_NAME, *UNKNOWN_KEYS, "task"])
        raw["quick"] = {key: rng.choice(valid_values(key) or HOSTILE)}
    elif choice < 0.85:  # an entry: its name, label, budgets or parameters
        section = rng.choice(list(ENTRY_SECTIONS))
        entries = raw.get(section)
        if not (isinstance(entries, list) and entries and all(isinstance(e, dict) for e in entries)):
            return raw  # an earlier mutation broke the section already
        entry = rng.choice(entries)
        roll = rng.random()
        if roll < 0.25:
            names = {"datasets": list_datasets(), "models": list_models(), "schemes": list_schemes()}[section]
            entry["name"] = rng.choice([*names, rng.choice(HOSTILE)])
        elif roll < 0.35:
            entry["label"] = rng.choice(HOSTILE)
        elif roll < 0.45 and section == "schemes":
            entry["budgets"] = rng.choice([["1/4"], ["1/2", "1/2"], *[[v] for v in HOSTILE[:12]], "1/4"])
        elif roll < 0.9:
            params = entry.setdefault("params", {}) if isinstance(entry.get("params", {}), dict) else {}
            keys = list(params) or ["rows", "num_hashes", "hidden", "num_users"]
            params[rng.choice([*keys, rng.choice(UNKNOWN_KEYS)])] = rng.choice(HOSTILE)
            entry["params"] = params
        else:
            entry[rng.choice(UNKNOWN_KEYS)] = 1
        raw[section] = entries
    else:  # a whole section emptied, wrong-typed or removed
        section = rng.choice(list(ENTRY_SECTIONS))
        raw[section] = rng.choice([[], {}, "x", 3, [1], None])
        if raw[section] is None:
            del raw[section]
    return raw


def to_toml(raw: dict[str, Any]) -> str:
    """The suite dict as TOML (entries as arrays of tables, values as literals); non-TOML values become
    strings, which is one more mutation."""

    def literal(value: Any) -> str:
        try:
            return toml_value(value)
        except (TypeError, ValueError):
            return toml_value(str(value))

    lines, tables = [], []
    for key, value in raw.items():
        if key in ENTRY_SECTIONS and isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables += [(key, entry) for entry in value]
        elif key == "quick" and isinstance(value, dict):
            tables.append(("[quick]", value))
        else:
            lines.append(f"{toml_key(key)} = {literal(value)}")
    for key, entry in tables:
        lines.append(key if key == "[quick]" else f"[[{key}]]")
        lines += [f"{toml_key(k)} = {literal(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"


def mutate_bytes(text: str, rng: random.Random) -> bytes:
    data = bytearray(text.encode())
    roll = rng.random()
    if roll < 0.35:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif roll < 0.6:
        data = data[: rng.randrange(len(data))]
    elif roll < 0.8:
        data[rng.randrange(len(data))] = rng.choice([0xFF, 0xC3, 0x80, 0x00])
    else:
        data += ("x = " + "[" * 5000 + "]" * 5000 + "\n").encode()
    return bytes(data)


def expensive(path: Path) -> bool:
    """Whether a suite that validates would take more than a second or two to train (then it is not run)."""
    try:
        suite = parse_suite(path)
    except EmbbenchError:
        return False  # refused: cheap, and the CLI must refuse it the same way
    settings = suite.settings
    return (len(suite.cells()) > 4 or settings["epochs"] > 2 or settings["dim"] > 64 or settings["batch_size"] < 8
            or max(settings["latency_batch_sizes"] or [0]) > 4096 or len(suite.datasets) > 1
            or settings["num_negatives"] > 20)


def check_outcome(result, db: Path, case: str) -> str:
    output = result.output
    assert "Traceback" not in output and result.exception is None or isinstance(result.exception, SystemExit), (
        f"{case}: {output}\n{result.exception!r}"
    )
    if result.exit_code == 2:
        lines = [line for line in output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{case}: not one error line:\n{output}"
        assert not db.exists(), f"{case}: refused, but a database was written"
        return "refused"
    assert result.exit_code == 0, f"{case}: exit {result.exit_code}:\n{output}"
    frame = ResultStore(db).frame()
    assert len(frame) and set(frame["status"]) <= {"ok", "skipped"}, (
        f"{case}: accepted, then cells failed:\n{frame[['scheme', 'status', 'error']].to_string()}"
    )
    return "ran"


def test_mutated_shipped_suites_run_or_are_refused_in_one_line(tmp_path):
    rng = random.Random(SEED)
    bases = sorted(builtin_suites().values())
    counts = {"refused": 0, "ran": 0, "expensive": 0}
    case = 0
    while counts["refused"] + counts["ran"] < CASES:
        case += 1
        base = rng.choice(bases)
        raw = cheap_base(base, rng)
        for _ in range(rng.choice([1, 1, 2])):
            raw = mutate(raw, rng)
        text = to_toml(raw)
        folder = tmp_path / f"case{case}"
        folder.mkdir()
        path, db = folder / "suite.toml", folder / "results.sqlite"
        if rng.random() < 0.15:
            path.write_bytes(mutate_bytes(text, rng))
        else:
            path.write_text(text)
        if expensive(path):
            counts["expensive"] += 1
            continue
        result = CliRunner().invoke(main, ["run", "suite", str(path), "--db", str(db), "--no-progress"])
        counts[check_outcome(result, db, f"case {case} (from {base.name}, seed {SEED})")] += 1
    print(counts)
    assert counts["refused"] + counts["ran"] >= CASES
    assert counts["ran"] >= 30 and counts["refused"] >= 200  # both outcomes are exercised


@pytest.mark.parametrize("name", sorted(builtin_suites()))
def test_every_cheap_base_runs(tmp_path, name):
    """The unmutated bases are valid and train: the fuzz starts from suites that work."""
    raw = cheap_base(builtin_suites()[name], random.Random(0))
    path, db = tmp_path / "suite.toml", tmp_path / "results.sqlite"
    path.write_text(to_toml(raw))
    result = CliRunner().invoke(main, ["run", "suite", str(path), "--db", str(db), "--no-progress"])
    assert check_outcome(result, db, name) == "ran"
