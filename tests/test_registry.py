"""Plugin discovery through entry points: built-ins, a real third-party install, broken and duplicate plugins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import embbench
from embbench import registry
from embbench.errors import ConfigError, PluginError
from embbench.schemes import Scheme, SchemePlan

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
    sys.path.remove(str(site))  # before refreshing, so that no test's plugins outlive it in the registry's cache
    for kind in registry.KINDS:
        registry.discover(kind, refresh=True)


def test_builtins_come_from_the_embbench_distribution():
    infos = {info.name: info for info in registry.list_plugins("schemes")}
    for name in ("full", "hashing-trick", "dhe"):
        assert infos[name].status == "ok"
        assert infos[name].distribution == "embbench" and infos[name].version == embbench.__version__
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
    with pytest.raises(ConfigError, match="unknown parameter 'num_hash' for scheme 'dhe'.*num_hashes"):
        registry.create_scheme("dhe", num_hash=4)


def broken_info(kind: str, name: str) -> registry.PluginInfo:
    registry.discover(kind, refresh=True)
    info = {i.name: i for i in registry.list_plugins(kind)}[name]
    assert info.status == "broken"
    return info


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("schemes", "embbench.schemes.Scheme"),
        ("datasets", "embbench.data.Dataset"),
        ("models", "embbench.models.RecModel or embbench.models.CTRModel"),
        ("tasks", "embbench.tasks.Task"),
    ],
)
def test_a_class_of_another_kind_is_broken_naming_the_target_and_the_base_class(extra_site, kind, expected):
    module = f"plain_{kind}_mod"
    write_distribution(extra_site, f"plain-{kind}", f"[embbench.{kind}]\nplain = {module}:Plain\n",
                       "class Plain:\n    pass\n", module)
    info = broken_info(kind, "plain")
    assert f"'plain = {module}:Plain'" in info.error and f"not a subclass of {expected}" in info.error
    assert "\n" not in info.error


def test_an_entry_point_that_loads_a_function_is_broken(extra_site):
    write_distribution(extra_site, "function-plugin", "[embbench.schemes]\nfunc = function_mod:make\n",
                       "def make():\n    return None\n", "function_mod")
    info = broken_info("schemes", "func")
    assert "function_mod:make" in info.error and "a function" in info.error
    assert "embbench.schemes.Scheme" in info.error
    with pytest.raises(PluginError, match="a function"):
        registry.create_scheme("func")


def test_an_entry_point_that_loads_an_instance_is_broken(extra_site):
    module = "from embbench_plugins.schemes.full import FullEmbedding\nfull = FullEmbedding()\n"
    write_distribution(extra_site, "instance-plugin", "[embbench.schemes]\ninst = instance_mod:full\n",
                       module, "instance_mod")
    info = broken_info("schemes", "inst")
    assert "instance_mod:full" in info.error and "an instance of FullEmbedding" in info.error


def test_a_plugin_calling_sys_exit_at_import_is_broken_and_others_keep_working(extra_site):
    write_distribution(extra_site, "exiting-plugin", "[embbench.schemes]\nquitter = exiting_mod:Quitter\n",
                       "import sys\nsys.exit('plugin gave up')\n", "exiting_mod")
    info = broken_info("schemes", "quitter")
    assert info.error == "SystemExit: plugin gave up"
    assert "Traceback" in info.traceback and "sys.exit('plugin gave up')" in info.traceback
    assert "full" in registry.list_schemes() and registry.create_scheme("full") is not None


def test_keyboard_interrupt_at_import_is_not_swallowed(extra_site):
    write_distribution(extra_site, "interrupted-plugin", "[embbench.schemes]\nstopped = interrupted_mod:X\n",
                       "raise KeyboardInterrupt\n", "interrupted_mod")
    with pytest.raises(KeyboardInterrupt):
        registry.discover("schemes", refresh=True)


def test_list_verbose_prints_a_broken_plugins_traceback(extra_site):
    from click.testing import CliRunner

    from embbench.cli import main

    write_distribution(extra_site, "exiting-plugin2", "[embbench.schemes]\nquitter2 = exiting_mod2:Quitter\n",
                       "import sys\nsys.exit('plugin gave up')\n", "exiting_mod2")
    registry.discover("schemes", refresh=True)
    plain = CliRunner().invoke(main, ["list", "schemes"])
    verbose = CliRunner().invoke(main, ["list", "schemes", "--verbose"])
    assert plain.exit_code == 0 and verbose.exit_code == 0, verbose.output
    assert "BROKEN: SystemExit: plugin gave up" in plain.output and "Traceback" not in plain.output
    assert "Traceback" in verbose.output and "sys.exit('plugin gave up')" in verbose.output
    assert "hashing-trick" in verbose.output


def test_provenance_gives_distribution_and_version():
    expected = {"distribution": "embbench", "version": embbench.__version__}
    assert registry.provenance("schemes", "hashing-trick") == expected
    with pytest.raises(PluginError, match="did you mean 'hashing-trick'"):
        registry.provenance("schemes", "hashing-trik")


def test_provenance_of_a_third_party_plugin_broken_or_not(extra_site):
    write_distribution(extra_site, "prov-plugin", "[embbench.schemes]\nprov = prov_mod:Missing\n", "", "prov_mod")
    registry.discover("schemes", refresh=True)
    assert registry.provenance("schemes", "prov") == {"distribution": "prov-plugin", "version": "1.0"}


def test_every_kind_has_list_and_create():
    assert {"ranking", "ctr"} <= set(registry.list_tasks())
    assert registry.create_task("ranking") is not None
    assert registry.create_dataset("synthetic", num_users=200, num_items=100) is not None
    model = registry.create_model("gmf", {"user": torch.nn.Embedding(3, 4), "item": torch.nn.Embedding(3, 4)}, 4)
    assert isinstance(model, registry.get_model_class("gmf"))
    with pytest.raises(ConfigError, match="unknown parameter 'widht' for model 'mlp'"):
        registry.create_model("mlp", {}, 4, widht=3)


def test_the_registry_names_the_scheme_it_creates():
    assert registry.create_scheme("double-hashing").name == "double-hashing"
    assert registry.create("schemes", "bloom").name == "bloom"


def test_a_scheme_made_outside_the_registry_is_named_after_its_class():
    def made_directly(name: str) -> Scheme:
        return registry.get_plugin("schemes", name)()

    assert made_directly("hashing-trick").name == "hashing-trick"  # HashingTrick
    assert made_directly("tt-rec").name == "tt-rec" and made_directly("robe").name == "robe"  # TTRec, ROBE
    assert made_directly("dhe").name == "deep-hash-embedding"  # DeepHashEmbedding
    assert ToySubSubScheme().name == "toy-sub-sub-scheme"
    scheme = made_directly("hashing-trick")
    scheme.name = "my-hash"
    assert scheme.name == "my-hash"


class ToyScheme(Scheme):
    def __init__(self, rows: int = 8, scale: float = 1.0, *, mode: str = "sum") -> None:
        self.rows = rows

    def plan(self, feature, budget_bytes):  # pragma: no cover - never planned here
        raise NotImplementedError

    def build(self, feature, plan, seed):  # pragma: no cover
        raise NotImplementedError


class ToySubScheme(ToyScheme):
    def __init__(self, width: int = 2) -> None:
        super().__init__(rows=width * 10, mode="concat")


class ToySubSubScheme(ToySubScheme):
    def __init__(self, depth: int = 3, **options: object) -> None:
        super().__init__(width=depth)


class ToyInheritedInit(ToySubScheme):
    pass


def test_get_params_binds_the_constructor_arguments_with_defaults():
    assert ToyScheme(5, mode="max").get_params() == {"rows": 5, "scale": 1.0, "mode": "max"}
    assert ToyScheme().get_params() == {"rows": 8, "scale": 1.0, "mode": "sum"}


def test_get_params_of_a_subclass_is_its_own_constructors():
    assert ToySubScheme(4).get_params() == {"width": 4}
    assert ToySubSubScheme(depth=7, colour="red").get_params() == {"depth": 7, "colour": "red"}
    assert ToyInheritedInit(width=6).get_params() == {"width": 6}


def test_get_params_of_builtin_schemes_needs_no_bookkeeping():
    assert registry.create_scheme("double-hashing", rows=64).get_params() == {"rows": 64, "combiner": "sum"}
    assert registry.create_scheme("bloom").get_params() == {"num_hashes": 2, "rows": None}
    assert registry.create_scheme("hashing-trick", rows=10).get_params() == {"rows": 10}


def test_the_constructor_signature_still_validates_parameters():
    with pytest.raises(TypeError):
        ToyScheme(1, 2.0, 3)  # mode is keyword-only
    assert registry.check_params("schemes", "double-hashing", {"rows": 3}) is None


def test_a_plan_may_state_its_own_unseen_kind():
    plain = SchemePlan("toy", {}, 0, 0)
    own = SchemePlan("toy", {}, 0, 0, unseen="dedicated")
    assert ToyScheme.unseen == "collided"
    assert ToyScheme.unseen_for(plain) == "collided" and ToyScheme().unseen_for(own) == "dedicated"
    assert ToyScheme.unseen_for() == "collided"
    with pytest.raises(ValueError, match="unseen must be one of"):
        SchemePlan("toy", {}, 0, 0, unseen="hashed")


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
