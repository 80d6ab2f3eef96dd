"""The public face: built-in plugins import from ``embbench`` alone, exactly as a third-party package would, and
every name ``embbench`` exports exists."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import embbench

REPO = Path(__file__).resolve().parents[1]
PLUGIN_FILES = sorted((REPO / "plugins").rglob("*.py"))


def embbench_submodule_imports(path: Path) -> list[str]:
    """``line: module`` for each import of an embbench module other than ``embbench`` itself."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        found += [f"{node.lineno}: {module}" for module in modules if module.startswith("embbench.")]
    return found


def test_the_plugin_files_are_found():
    assert len(PLUGIN_FILES) > 10


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda path: str(path.relative_to(REPO / "plugins")))
def test_a_plugin_imports_nothing_from_embbench_but_embbench_itself(path):
    assert embbench_submodule_imports(path) == []


def test_the_import_check_sees_every_form_of_import(tmp_path):
    source = tmp_path / "plugin.py"
    source.write_text(
        "import embbench\nfrom embbench import Scheme\nimport embbench.data\nfrom embbench.measure.latency import x\n"
        "import torch, embbench.ctr as ctr\ndef f():\n    from embbench.errors import ConfigError\n"
        "from embbench_plugins.schemes import multi_hashing\n"
    )
    modules = [line.rsplit(": ", 1)[1] for line in embbench_submodule_imports(source)]
    assert sorted(modules) == ["embbench.ctr", "embbench.data", "embbench.errors", "embbench.measure.latency"]


def test_every_exported_name_exists():
    missing = [name for name in embbench.__all__ if not hasattr(embbench, name)]
    assert missing == []


def test_no_name_is_exported_twice():
    assert len(embbench.__all__) == len(set(embbench.__all__))


@pytest.mark.parametrize(
    "name",
    [
        "list_schemes", "list_datasets", "list_models", "list_tasks",
        "create_scheme", "create_dataset", "create_model", "create_task",
    ],
)
def test_the_registry_of_every_kind_is_public(name):
    assert name in embbench.__all__


def test_importing_embbench_imports_neither_pytest_nor_the_contract_checks():
    code = "import sys, embbench; print('pytest' in sys.modules, 'embbench.testing' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert result.stdout.split() == ["False", "False"]
