"""The ``embbench`` command: a thin skin over the library. Each command parses, calls one function, prints.

User errors print one line ``error: ...`` on stderr and exit with code 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from embbench.errors import EmbbenchError
from embbench.run.store import DEFAULT_DB

EXIT_USER_ERROR = 2


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """A warning as one line on stderr, ``warning: ...`` (no file, line number or source line)."""
    click.echo(f"warning: {' '.join(str(message).split())}", err=True)


class Group(click.Group):
    """Turns EmbbenchError into one line and exit code 2, and every warning into one ``warning:`` line."""

    def invoke(self, ctx: click.Context) -> Any:
        shown = warnings.showwarning
        warnings.showwarning = _show_warning
        try:
            return super().invoke(ctx)
        except EmbbenchError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_USER_ERROR)
        finally:
            warnings.showwarning = shown


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=_json_default))


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_params(items: tuple[str, ...]) -> dict[str, Any]:
    """``--param KEY=VALUE`` options as keyword arguments (VALUE read as JSON where it parses, else a string)."""
    from embbench.errors import ConfigError

    keywords = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--param '{item}' must look like KEY=VALUE, e.g. --param num_hashes=64")
        key, value = item.split("=", 1)
        keywords[key.strip()] = _parse_value(value.strip())
    return keywords


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="embbench")
def main() -> None:
    """Benchmark memory-efficient embedding schemes: run suites, store results, report Pareto fronts."""


@main.command("list")
@click.argument("kind", type=click.Choice(["schemes", "datasets", "models", "tasks", "suites"]), default="schemes")
@click.argument("pattern", default="*")
@click.option("--exclude", multiple=True, help="Shell-style pattern of names to leave out (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (a stable contract).")
@click.option("--verbose", "-v", is_flag=True, help="Show the traceback of each broken plugin.")
def list_command(kind: str, pattern: str, exclude: tuple[str, ...], as_json: bool, verbose: bool) -> None:
    """List registered plugins (or built-in suites) whose names match PATTERN, e.g. 'hash*'."""
    if kind == "suites":
        from embbench.run.suites import builtin_suites, parse_suite

        rows = []
        for name, path in sorted(builtin_suites().items()):
            import fnmatch

            if fnmatch.fnmatchcase(name, pattern) and not any(fnmatch.fnmatchcase(name, p) for p in exclude):
                rows.append({"name": name, "path": str(path), "description": parse_suite(path).description})
        if as_json:
            _echo_json(rows)
        else:
            for row in rows:
                click.echo(f"{row['name']:<20} {row['description']}")
        return
    from embbench.registry import list_plugins

    infos = list_plugins(kind, pattern, list(exclude) or None)
    if as_json:
        _echo_json([dict(info.as_dict(), traceback=info.traceback) if verbose else info.as_dict() for info in infos])
        return
    width = max([20, *(len(info.name) for info in infos)])
    for info in infos:
        text = info.summary if info.status == "ok" else f"BROKEN: {info.error}"
        click.echo(f"{info.name:<{width}} {info.status:<7} {info.origin:<22} {text}")
        if verbose and info.traceback:
            for line in info.traceback.rstrip().splitlines():
                click.echo(f"    {line}")


@main.command("size")
@click.argument("scheme")
@click.option("--vocab", type=click.IntRange(min=1), required=True, help="Number of distinct IDs.")
@click.option("--dim", type=click.IntRange(min=1), default=32, show_default=True, help="Embedding dimension.")
@click.option("--budget", default="1", show_default=True, help="Fraction of the full table (1/4) or bytes (64MB).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Scheme hyper-parameter (repeatable).")
@click.option("--collisions/--no-collisions", default=True, show_default=True,
              help="Count IDs sharing their index tuple (exact up to 10^7 IDs, estimated from a sample beyond).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (a stable contract).")
def size_command(
    scheme: str, vocab: int, dim: int, budget: str, params: tuple[str, ...], collisions: bool, as_json: bool
) -> None:
    """Resolve SCHEME's hyper-parameters for a vocabulary and budget, and give its exact size."""
    from embbench.measure.sizing import size_report

    keywords = _parse_params(params)
    result = size_report(scheme, vocab, dim, budget, keywords, collisions=collisions)
    if as_json:
        _echo_json(result)
        return
    click.echo(f"scheme      {scheme}")
    for key, value in result["params"].items():
        click.echo(f"  {key:<12}{value}")
    click.echo(f"size        {result['size_bytes']:,} bytes ({result['budget_used']:.1%} of the budget)")
    click.echo(f"budget      {result['budget_bytes']:,} bytes")
    click.echo(f"full table  {result['full_bytes']:,} bytes ({result['compression']:.1f}x larger)")
    click.echo(f"unseen IDs  {result['unseen_ids']}")
    stats = result["collisions"]
    if stats is not None:
        if stats.get("estimated"):
            click.echo(
                f"collisions  about {stats['colliding_ids']:,} of {stats['num_ids']:,} IDs share their index tuple "
                f"({stats['collision_fraction']:.4%}; estimated from {stats['sample_ids']:,} random IDs, of which "
                f"{stats['sample_collision_fraction']:.4%} collide)"
            )
        else:
            click.echo(
                f"collisions  {stats['colliding_ids']:,} of {stats['num_ids']:,} IDs share their index tuple "
                f"({stats['collision_fraction']:.4%}); {stats['distinct_tuples']:,} distinct tuples"
            )


@main.command("check")
@click.argument("scheme")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Scheme hyper-parameter (repeatable); the checks run with the defaults, then with these.")
@click.option("--dim", type=int, default=16, show_default=True, help="Embedding dimension of the checked feature.")
@click.option("--json", "as_json", is_flag=True, help="One object per check and parameter set (a stable contract).")
@click.pass_context
def check_command(ctx: click.Context, scheme: str, params: tuple[str, ...], dim: int, as_json: bool) -> None:
    """Check that SCHEME keeps the scheme contract (embbench.testing): PASS or FAIL per check; exit 1 on a FAIL."""
    from embbench.testing import check_scheme

    keywords = _parse_params(params)
    # The given parameters run first, so that values the scheme rejects are reported before anything runs.
    given = check_scheme(scheme, keywords, dim) if keywords else []
    outcomes = [({}, check_scheme(scheme, None, dim))] + ([(keywords, given)] if keywords else [])
    rows = [
        {"scheme": scheme, "params": parameters, **result.as_dict()}
        for parameters, results in outcomes
        for result in results
    ]
    if as_json:
        _echo_json(rows)
    else:
        width = max(len(row["check"]) for row in rows)
        for row in rows:
            label = ",".join(f"{key}={json.dumps(value)}" for key, value in row["params"].items()) or "defaults"
            first_line = (row["message"].splitlines() or [""])[0]
            status = "PASS" if row["passed"] else "FAIL"
            click.echo(f"{status}  {row['check']:<{width}}  [{label}]  {first_line}".rstrip())
    if not all(row["passed"] for row in rows):
        ctx.exit(1)


@main.group("run", cls=Group)
def run_group() -> None:
    """Run benchmarks."""


@run_group.command("suite")
@click.argument("suite")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_DB, show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder with dataset files (default: $EMBBENCH_DATA_DIR, else ~/.cache/embbench/data).")
@click.option("--quick", is_flag=True, help="Apply the suite's [quick] profile (fewer epochs/seeds).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("--rerun", is_flag=True, help="Run every cell again, also those already finished (rows replaced).")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes to train each cell over (torchrun; gloo on CPU, nccl on GPU): tables sharded by "
                   "torchrec DistributedModelParallel, network schemes data-parallel.")
@click.option("--nnodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Machines to train each cell over, --nproc processes on each: run the same command on every "
                   "machine, with its own --node-rank (docs/cluster.md). Node 0 alone writes --db.")
@click.option("--node-rank", type=click.IntRange(min=0), default=None,
              help="This machine's number, 0 to NNODES-1; 0 is the machine at --rdzv-endpoint.")
@click.option("--rdzv-endpoint", default=None, metavar="HOST:PORT",
              help="Where the machines of a --nnodes run meet: node 0's address and a free port there.")
@click.option("--rdzv-id", default=None, help="Name of the run, the same on every machine.  [default: embbench]")
@click.option("--rdzv-backend", type=click.Choice(["static", "c10d"]), default=None,
              help="torchrun rendezvous: static numbers machines by --node-rank (node 0 writes --db); c10d numbers "
                   "them as they join (then --db must be a path every machine can write).  [default: static]")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runner processes sharing the suite, each cell trained by one of them, each with 1/N of the "
                   "torch threads. Other runners on the same --db (other shells, other machines) share it too.")
@click.option("--executor", type=click.Choice(["in-process", "ray"]), default="in-process", show_default=True,
              help="Where cells train: here, or as Ray tasks (pip install 'embbench[ray]'; docs/cluster.md), each "
                   "asking for as many CPUs as the torch threads it trains with; this process writes the results.")
@click.option("--address", default=None, metavar="HOST:PORT",
              help="The Ray cluster to run on (`ray start --head` prints it); default: Ray started here.")
def run_suite_command(
    suite: str, db: Path, data_dir: Path | None, quick: bool, no_progress: bool, rerun: bool, nproc: int,
    workers: int, executor: str, address: str | None, nnodes: int, node_rank: int | None,
    rdzv_endpoint: str | None, rdzv_id: str | None, rdzv_backend: str | None,
) -> None:
    """Run every unfinished cell of SUITE (a built-in name or a .toml path) into the results database."""
    from embbench.distributed.launch import launch, launched_by_torchrun, resolve_nodes
    from embbench.errors import ConfigError
    from embbench.run.store import ResultStore
    from embbench.run.sweep import run_suite

    nodes = resolve_nodes(nnodes, node_rank, rdzv_endpoint, rdzv_id, rdzv_backend)
    if nodes.several and (workers > 1 or executor == "ray"):
        option = f"--workers {workers}" if workers > 1 else "--executor ray"
        raise ConfigError(f"{option} cannot be combined with --nnodes {nnodes}: --nnodes trains each cell over "
                          "several machines; use one of them")
    if workers > 1 and nproc > 1:
        raise ConfigError(
            f"--workers {workers} cannot be combined with --nproc {nproc}: --nproc trains each cell over several "
            "processes, --workers trains several cells at once; use one of them"
        )
    if executor == "ray" and nproc > 1:
        raise ConfigError(f"--nproc {nproc} cannot be combined with --executor ray: each Ray task trains its cells "
                          "in one process (see docs/cluster.md); run without --nproc")
    if (nproc > 1 or nodes.several) and not launched_by_torchrun():
        if nodes.may_hold_rank_zero:  # refused here, once, rather than by every rank; other nodes never touch it
            ResultStore(db).check(writable=True)
        # The children learn the world size from torchrun; "--nproc" itself would clash with torchrun's options.
        argv = ["-m", "embbench.cli", "run", "suite", suite, "--db", str(db)]
        argv += ["--data-dir", str(data_dir)] if data_dir is not None else []
        argv += ["--quick"] if quick else []
        argv += ["--no-progress"] if no_progress else []
        argv += ["--rerun"] if rerun else []
        sys.exit(launch(nproc, argv, nodes=nodes))
    summary = run_suite(suite, db=db, data_dir=data_dir, quick=quick, progress=not no_progress, rerun=rerun,
                        workers=workers, executor=executor, address=address)
    from embbench.distributed import is_main

    if not is_main():
        sys.exit(1 if summary.failed else 0)
    elsewhere = f", {summary.elsewhere} by other runners" if summary.elsewhere else ""
    click.echo(
        f"suite {summary.suite}: {summary.total} cells, {summary.already_done} already done, "
        f"{summary.ok} ok, {summary.failed} failed, {summary.skipped} skipped{elsewhere} -> {summary.db}"
    )
    for failure in summary.failures:
        click.echo(f"  failed: {failure}", err=True)
    if summary.failed:
        sys.exit(1)


@main.command("merge")
@click.argument("target", type=click.Path(path_type=Path))
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--prefer", type=click.Choice(["target", "source"]), default=None,
              help="Settle conflicts (a cell ok in both, metrics differing): keep the target's row or take the "
                   "source's. Without it, the target's row is kept and the command exits with code 1.")
@click.option("--tolerance", type=click.FloatRange(min=0, max=1, max_open=True), default=0.0, show_default=True,
              help="Relative difference below which the metrics of two ok rows of a cell agree.")
@click.option("--json", "as_json", is_flag=True, help="The summary and every conflict as JSON (a stable contract).")
def merge_command(target: Path, sources: tuple[Path, ...], prefer: str | None, tolerance: float,
                  as_json: bool) -> None:
    """Import the cells of SOURCES (databases made on other machines; read, never changed) into TARGET, in one
    transaction: one row per cell, ok rows preferred to failed or skipped ones, conflicts listed."""
    from embbench.run.merge import merge_databases

    summary = merge_databases(target, list(sources), prefer=prefer, tolerance=tolerance)
    if as_json:
        _echo_json(summary.as_dict())
    else:
        def counts(imported: int, kept: int, replaced: int, conflicts: int) -> str:
            return f"{imported} imported, {kept} kept, {replaced} replaced, {conflicts} conflicts"

        total = counts(summary.imported, summary.kept, summary.replaced, len(summary.conflicts))
        click.echo(f"merged {len(summary.sources)} database(s) into {summary.target}: {total}")
        for source in summary.sources:
            click.echo(f"  {source.path}: {counts(source.imported, source.kept, source.replaced, source.conflicts)}")
        for conflict in summary.conflicts:
            what = ", ".join(f"{name} {mine} (target) vs {theirs} (source)"
                             for name, (mine, theirs) in conflict.differences.items())
            click.echo(f"  conflict: {conflict.cell} [{conflict.cell_key}] in {conflict.source}: {what}; "
                       f"the {conflict.kept}'s row kept")
    if summary.unresolved:
        click.echo(f"{len(summary.conflicts)} conflict(s): the target's rows were kept; pass --prefer target or "
                   "--prefer source to settle them", err=True)
        sys.exit(1)


def _results_frame(db: Path, suite: str | None) -> Any:
    from embbench.run.record import result_frame
    from embbench.run.store import ResultStore

    return result_frame(ResultStore(db).frame(suite))


@main.command("results")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_DB, show_default=True)
@click.option("--suite", default=None, help="Only this suite's cells.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per cell (a stable contract).")
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header row.")
def results_command(db: Path, suite: str | None, as_json: bool, as_csv: bool) -> None:
    """Print stored results."""
    frame = _results_frame(db, suite)
    if as_json:
        from embbench.run.record import JSON_VALUE_FIELDS

        records = json.loads(frame.to_json(orient="records"))
        for record in records:  # e.g. history: the per-epoch objects, not their text
            for name in JSON_VALUE_FIELDS:
                if isinstance(record.get(name), str):
                    record[name] = json.loads(record[name])
        _echo_json(records)
    elif as_csv:
        click.echo(frame.to_csv(index=False), nl=False)
    else:
        if frame.empty:
            click.echo("no results")
            return
        metrics = [c for c in ("test_auc", "test_hr10", "test_logloss") if c in frame and frame[c].notna().any()]
        shown = frame[["suite", "dataset", "model", "scheme_label", "budget", "size_bytes", "device", "seed",
                       "status", *metrics, "train_seconds"]]

        def fmt(digits: int) -> Any:
            return lambda v: "-" if v is None or v != v else f"{v:.{digits}f}"

        with_text = shown.assign(
            **{c: shown[c].map(fmt(4)) for c in metrics}, train_seconds=shown["train_seconds"].map(fmt(1))
        )
        click.echo(with_text.to_string(index=False))


@main.command("report")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_DB, show_default=True)
@click.option("--suite", default=None, help="Only this suite's cells.")
@click.option("--suite-file", "suite_files", multiple=True,
              type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="A suite file run from a path, to show its text in the report (repeatable).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("report"), show_default=True,
              help="Folder to write the report into (created; refused with one line if it cannot be written).")
def report_command(db: Path, suite: str | None, suite_files: tuple[Path, ...], out: Path) -> None:
    """Write OUT/report.md and a self-contained OUT/report.html: tables, Pareto plots vs size and latency."""
    from embbench.measure.environment import git_commit, package_versions
    from embbench.report import shipped_suite_sources, write_report
    from embbench.run.store import ResultStore
    from embbench.run.suites import parse_suite

    frame = ResultStore(db).frame(suite)
    context = {"database": str(db), "suite": suite or "all", "git commit": git_commit(),
               "versions": package_versions()}
    sources = shipped_suite_sources(frame["suite"].dropna()) if "suite" in frame else {}
    sources.update({parse_suite(path).name: path.read_text(encoding="utf-8") for path in suite_files})
    path = write_report(frame, out, context=context, suite_sources=sources)
    click.echo(f"report written to {path} and {path.with_name('report.html')}")


if __name__ == "__main__":
    main()
