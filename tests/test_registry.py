"""Plugin discovery through entry points: built-ins, a real third-party install, broken and duplicate plugins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from embbench import registry
from embbench.errors import PluginError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_PLUGIN = REPO / "docs" / "example-plugin"


def embbench_cli(*args: str, pythonpath: Path | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "embbench.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def write_distribution(site: Path, name: str, entry_points: str, module: str = "", module_name: str = "") -> None:
    """A minimal installed distribution (dist-info with entry points), as pip would leave it."""
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(entry_points)
    if module_name:
        (site / f"{module_name}.py").write_text(module)


@pytest.fixture
def extra_site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    yield site
    for kind in registry.KINDS:
        registry.discover(kind, refresh=True)


def test_builtins_come_from_the_embbench_distribution():
    infos = {info.name: info for info in registry.list_plugins("schemes")}
    for name in ("full", "hashing-trick", "dhe"):
        assert infos[name].status == "ok"
        assert infos[name].distribution.startswith("embbench ")
    assert {"gmf", "mlp"} <= set(registry.list_models())
    assert {"synthetic", "movielens-1m"} <= set(registry.list_datasets())


def test_list_filters_with_wildcards_and_excludes():
    assert registry.list_schemes("hash*") == ["hash-embedding", "hashing-trick"]
    assert registry.list_schemes("hash*", exclude="*embedding") == ["hashing-trick"]
    assert registry.list_schemes(["full", "dhe"]) == ["dhe", "full"]  # sorted naturally, not in pattern order
    assert "dhe" not in registry.list_schemes("*", exclude="d*")


def test_broken_plugin_is_listed_with_its_error_and_others_keep_working(extra_site):
    write_distribution(
        extra_site, "broken-plugin", "[embbench.schemes]\nbroken = broken_mod:Scheme\n",
        "raise ImportError('needs libfoo')\n", "broken_mod",
    )
    registry.discover("schemes", refresh=True)
    info = {i.name: i for i in registry.list_plugins("schemes")}["broken"]
    assert info.status == "broken" and "needs libfoo" in info.error and "broken-plugin" in info.distribution
    assert registry.create_scheme("full") is not None
    with pytest.raises(PluginError, match="broken"):
        registry.create_scheme("broken")


def test_two_plugins_with_one_name_give_an_error_naming_both_distributions(extra_site):
    for dist in ("first-dist", "second-dist"):
        module = dist.replace("-", "_")
        write_distribution(
            extra_site, dist, f"[embbench.schemes]\ntwin = {module}:Twin\n", "class Twin: pass\n", module
        )
    registry.discover("schemes", refresh=True)
    with pytest.raises(PluginError, match=r"registered twice.*first-dist 1\.0.*second-dist 1\.0"):
        registry.create_scheme("twin")


def test_unknown_scheme_suggests_the_closest_name():
    with pytest.raises(PluginError, match="did you mean 'hashing-trick'"):
        registry.create_scheme("hashing-trik")


def test_unknown_hyper_parameter_names_the_closest_one():
    from embbench.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown parameter 'num_hash' for scheme 'dhe'.*num_hashes"):
        registry.create_scheme("dhe", num_hash=4)


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory) -> Path:
    """The example plugin of docs/plugins.md, really installed (pip, from its own pyproject) into a folder."""
    target = tmp_path_factory.mktemp("plugin-site")
    build = tmp_path_factory.mktemp("plugin-src")
    subprocess.run(["cp", "-r", str(EXAMPLE_PLUGIN) + "/.", str(build)], check=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(build)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return target


def test_installed_third_party_plugin_is_listed(installed_example):
    result = embbench_cli("list", "schemes", "--json", pythonpath=installed_example)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["modulo"] == {
        "name": "modulo", "status": "ok", "distribution": "embbench-modulo 0.1.0", "error": None,
        "summary": "example plugin: row = ID mod m",
    }


def test_installed_third_party_plugin_runs_through_a_suite(installed_example, tmp_path):
    suite = tmp_path / "plugin.toml"
    suite.write_text(
        'epochs = 1\nbudgets = ["1/4"]\n'
        '[[datasets]]\nname = "synthetic"\nparams = { num_users = 200, num_items = 100, interactions_per_user = 8 }\n'
        '[[models]]\nname = "gmf"\n[[schemes]]\nname = "modulo"\n'
    )
    db = tmp_path / "results.sqlite"
    result = embbench_cli("run", "suite", str(suite), "--db", str(db), "--no-progress", pythonpath=installed_example)
    assert result.returncode == 0, result.stderr
    out = embbench_cli("results", "--db", str(db), "--json", pythonpath=installed_example)
    rows = json.loads(out.stdout)
    assert [(r["scheme"], r["status"]) for r in rows] == [("modulo", "ok")]


def test_example_plugin_own_tests_pass(installed_example):
    env = dict(os.environ, PYTHONPATH=str(installed_example))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE_PLUGIN / "tests")],
        capture_output=True, text=True, env=env, cwd=EXAMPLE_PLUGIN, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
