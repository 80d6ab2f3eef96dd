"""Helpers for tests of the command line: run a command in-process, and hold a refusal to the contract."""

from __future__ import annotations

from typing import Any

from click.testing import CliRunner

from embbench.cli import main


def invoke(*args: str) -> Any:
    """``embbench ARGS`` in this process; the result's output holds stdout and stderr."""
    return CliRunner().invoke(main, list(args))


def assert_one_line_error(result: Any, *fragments: str) -> None:
    """Exit code 2 and one ``error:`` line holding every fragment, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
