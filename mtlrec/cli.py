"""mtlrec: multi-task models for recommendation, from data to a scoring service.

Errors the user can cause (a bad file, column, key or name) print one line and exit with status 2.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mtlrec.errors import MTLRecError, first_line, make_dir

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
err = Console(stderr=True)


def _fail(exc: MTLRecError) -> None:
    err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


# Options that 'train' and 'sweep' share (a sweep passes them on to every run it starts).
DatasetOption = Annotated[str | None, typer.Option(help="Registered dataset name")]
ConfigOption = Annotated[Path | None, typer.Option(help="YAML config file")]
SetOption = Annotated[
    list[str] | None, typer.Option("--set", help="Override: section.key=value (repeatable)")
]
EpochsOption = Annotated[int | None, typer.Option(help="train.epochs")]
MaxRowsOption = Annotated[int | None, typer.Option(help="Cap rows per split (dataset.max_rows)")]
TrainFileOption = Annotated[str | None, typer.Option("--train", help="Your training CSV/Parquet")]
ValidFileOption = Annotated[str | None, typer.Option("--valid", help="Your validation file")]
TestFileOption = Annotated[str | None, typer.Option("--test", help="Your test file")]
SepOption = Annotated[
    str | None,
    typer.Option(help="The CSV's separator (default: the one the run was trained with); 'tab'"),
]
SchemaOption = Annotated[str | None, typer.Option(help="Schema YAML for your own files")]


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write")],
    dataset: DatasetOption = None,
    model: Annotated[str | None, typer.Option(help="Registered model name")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    epochs: EpochsOption = None,
    max_rows: MaxRowsOption = None,
    seed: Annotated[int | None, typer.Option(help="train.seed")] = None,
    balance: Annotated[str | None, typer.Option(help="Balancer name (balance.name)")] = None,
    train_file: TrainFileOption = None,
    valid_file: ValidFileOption = None,
    test_file: TestFileOption = None,
    schema: SchemaOption = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint.pt")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar or per-epoch lines")] = False,
    diagnose: Annotated[
        bool,
        typer.Option(
            help="Record gradient conflict and gate statistics to OUT/diagnostics.json "
            "(train.diagnose=true; extra backward passes)"
        ),
    ] = False,
    stream: Annotated[
        bool,
        typer.Option(
            help="Stream the training Parquet file(s) from disk in bounded memory "
            "(train.stream=true; automatic above train.stream_threshold_mb)"
        ),
    ] = False,
) -> None:
    """Train a model, select it on validation, evaluate the test split once."""
    from mtlrec import config as cfg
    from mtlrec.train.run import train_run

    try:
        user = cfg.load_yaml(config) if config else {}
        overrides = _train_overrides(
            dataset=dataset, model=model, set_=set_, epochs=epochs, max_rows=max_rows,
            seed=seed, balance=balance, train_file=train_file, valid_file=valid_file,
            test_file=test_file, schema=schema,
        )  # fmt: skip
        if quiet:
            overrides.append({"train": {"progress": False}})
        if diagnose:
            overrides.append({"train": {"diagnose": True}})
        if stream:
            overrides.append({"train": {"stream": True}})
        resolved = cfg.resolve(user, overrides)
        echo = _quiet_echo if quiet else _echo
        metrics = train_run(resolved, out, resume=resume, echo=echo)
    except MTLRecError as exc:
        _fail(exc)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        _print_metrics(
            metrics, title=f"{resolved['model']['name']} on {resolved['dataset']['name']}"
        )
        console.print(f"wrote {out / 'metrics.json'}", highlight=False)


def _echo(msg: str) -> None:
    """One line to stderr, never wrapped (a log file must keep each warning on one line)."""
    err.print(msg, highlight=False, soft_wrap=True)


def _quiet_echo(msg: str) -> None:
    """--quiet drops the progress lines, never a warning about the data or the run."""
    if msg.startswith("warning:"):
        _echo(msg)


def _train_overrides(
    *,
    dataset: str | None,
    model: str | None,
    set_: list[str] | None,
    epochs: int | None,
    max_rows: int | None,
    seed: int | None,
    balance: str | None,
    train_file: str | None,
    valid_file: str | None,
    test_file: str | None,
    schema: str | None,
) -> list[dict[str, Any]]:
    """The config overrides that ``train``'s flags stand for, in the order they apply."""
    from mtlrec import config as cfg

    overrides: list[dict[str, Any]] = []
    if train_file or valid_file or schema:
        files = {"name": "files", "train": train_file, "valid": valid_file, "schema": schema}
        if test_file:
            files["test"] = test_file
        overrides.append({"dataset": files})
    flags = {
        ("dataset", "name"): dataset,
        ("model", "name"): model,
        ("train", "epochs"): epochs,
        ("dataset", "max_rows"): max_rows,
        ("train", "seed"): seed,
        ("balance", "name"): balance,
    }
    for (section, key), value in flags.items():
        if value is not None:
            overrides.append({section: {key: value}})
    return overrides + [cfg.parse_override(s) for s in set_ or []]


@app.command()
def sweep(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the runs and SWEEP.md")],
    models: Annotated[str, typer.Option(help="Comma-separated model names")],
    balancers: Annotated[
        str | None, typer.Option(help="Comma-separated balancer names (default: the config's)")
    ] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds")] = "1,2,3",
    parallel: Annotated[
        int, typer.Option(help="Training processes at once (cores shared out)")
    ] = 1,
    force: Annotated[bool, typer.Option(help="Retrain runs that already finished")] = False,
    rank_by: Annotated[
        str | None,
        typer.Option(help="Rank by this task's validation metric (default: the early-stop score)"),
    ] = None,
    dataset: DatasetOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    epochs: EpochsOption = None,
    max_rows: MaxRowsOption = None,
    train_file: TrainFileOption = None,
    valid_file: ValidFileOption = None,
    test_file: TestFileOption = None,
    schema: SchemaOption = None,
) -> None:
    """Train models x balancers x seeds, rank them on validation, report test metrics.

    Each combination is a 'mtlrec train' run in OUT/<model>--<balancer>/seed-<seed>; finished
    runs are reused and interrupted ones resume, so the same command continues a stopped sweep."""
    import shlex

    from mtlrec import config as cfg
    from mtlrec.train.sweep import (
        SUMMARY_JSON,
        SUMMARY_MD,
        SUMMARY_PNG,
        check_config,
        check_names,
        markdown,
        plan,
        run_jobs,
        run_warnings,
        stale_runs,
        summarise,
        write_figure,
    )

    def resolved(model: str, balancer: str | None, seed: int | None = None) -> dict[str, Any]:
        """The config ``mtlrec train`` will resolve for one run of the sweep."""
        return cfg.resolve(
            user,
            _train_overrides(
                dataset=dataset, model=model, set_=set_, epochs=epochs, max_rows=max_rows,
                seed=seed, balance=balancer, train_file=train_file, valid_file=valid_file,
                test_file=test_file, schema=schema,
            ),
        )  # fmt: skip

    try:
        model_names = _comma_list([models])
        if not model_names:
            raise MTLRecError(f"--models {models!r}: name at least one model (mtlrec list models)")
        balancer_names: list[str | None] = list(_comma_list([balancers])) or [None]
        try:
            seed_values = [int(x) for x in _comma_list([seeds])]
        except ValueError:
            raise MTLRecError(f"--seeds {seeds!r}: expected comma-separated integers") from None
        if parallel < 1:
            raise MTLRecError("--parallel must be >= 1")
        check_names(model_names, balancer_names)  # unknown names fail now, not mid-sweep
        user = cfg.load_yaml(config) if config else {}
        for m in model_names:  # every key and value too
            for b in balancer_names:
                check_config(resolved(m, b), rank_by)
        if balancer_names == [None]:  # name the configured balancer in folders and tables
            balancer_names = [resolved(model_names[0], None)["balance"]["name"]]
        jobs = plan(out, model_names, balancer_names, seed_values)
        stale = [] if force else stale_runs(jobs, lambda j: resolved(j.model, j.balancer, j.seed))
        if stale:  # a finished run of another config must not be read back as this one
            raise MTLRecError(
                f"{len(stale)} run(s) in {out} were trained with another configuration, e.g. "
                f"{stale[0]}; use --force to retrain them, or another --out"
            )
        train_args: list[str] = []
        for flag, value in (
            ("--dataset", dataset),
            ("--config", config),
            ("--epochs", epochs),
            ("--max-rows", max_rows),
            ("--train", train_file),
            ("--valid", valid_file),
            ("--test", test_file),
            ("--schema", schema),
        ):
            if value is not None:
                train_args += [flag, str(value)]
        for item in set_ or []:
            train_args += ["--set", item]
        make_dir(out, "--out")  # before any run starts: a path through a file fails here
    except MTLRecError as exc:
        _fail(exc)
    err.print(f"sweep: {len(jobs)} runs, {parallel} at a time, in {out}", highlight=False)
    statuses = run_jobs(jobs, train_args, parallel, force=force)
    for line in run_warnings(jobs):
        _echo(line)
    try:
        summary = summarise(jobs, statuses, rank_by)
    except MTLRecError as exc:
        _fail(exc)
    from mtlrec.train.checkpoint import save_text

    command = "mtlrec sweep " + shlex.join(sys.argv[2:]) if len(sys.argv) > 2 else "mtlrec sweep"
    save_text(json.dumps(summary, indent=2, default=str), out / SUMMARY_JSON)
    save_text(markdown(summary, command), out / SUMMARY_MD)
    wrote = [out / SUMMARY_MD, out / SUMMARY_JSON]
    if write_figure(summary, out / SUMMARY_PNG):
        wrote.append(out / SUMMARY_PNG)
    _print_sweep(summary)
    console.print(f"wrote {', '.join(map(str, wrote))}", highlight=False)
    if summary["failed"]:
        raise typer.Exit(1)


def _comma_list(items: list[str | None]) -> list[str]:
    """The names in options written ``a,b`` and/or repeated, in order, blanks dropped."""
    return [x.strip() for item in items for x in (item or "").split(",") if x.strip()]


def _print_sweep(summary: dict[str, Any]) -> None:
    rows = summary["configurations"]
    tasks = list(dict.fromkeys(t for r in rows for t in r["test"]))
    by = f"{summary['rank_by']} validation metric" if summary.get("rank_by") else "validation score"
    table = Table(title=f"sweep: ranked by mean {by} (test reported, not used)")
    for name in ["rank", "configuration", "seeds", "valid score"] + [f"test {t}" for t in tasks]:
        table.add_column(name, justify="left" if name == "configuration" else "right")
    for i, r in enumerate(rows, 1):
        cells = []
        for t in tasks:
            stats = r["test"].get(t, {})
            cells.append(_fmt(stats.get("mean")) + _std(stats.get("std")))
        score = r["valid_score"]
        table.add_row(
            str(i),
            r["config"],
            str(len(r["seeds_ok"])),
            _fmt(score["mean"]) + _std(score["std"]),
            *cells,
        )
    console.print(table)


def _std(value: float | None) -> str:
    return "" if value is None else f" ± {value:.4f}"


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by 'mtlrec train'")],
    data: Annotated[str | None, typer.Option(help="Evaluate on this CSV/Parquet instead")] = None,
    sep: SepOption = None,
) -> None:
    """Re-evaluate a finished run on its test split (or on a file), with its saved encoder."""
    from mtlrec.train.run import evaluate_run

    try:
        metrics = evaluate_run(run_dir, data, warn=_echo, sep=sep)
    except MTLRecError as exc:
        _fail(exc)
    _print_metrics(metrics, title=str(run_dir))
    print(json.dumps(metrics))


@app.command()
def predict(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory, or an export folder ('mtlrec export')")
    ],
    data: Annotated[str, typer.Option(help="CSV or Parquet file (or folder) to score")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .parquet, .pq or .csv")],
    keep: Annotated[
        list[str] | None,
        typer.Option(help="Input column(s) to copy into the output, e.g. ids (repeatable, or a,b)"),
    ] = None,
    fusion: Annotated[
        Path | None,
        typer.Option(help="Fusion YAML (a 'serve:' mapping): adds the fused ranking 'score'"),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per forward pass")] = None,
    sep: SepOption = None,
) -> None:
    """Score every row of a file: per-task predictions (pred_<task>, pred_<task>_joint)."""
    from mtlrec.train.predict_file import predict_file

    columns = _comma_list(keep or [])
    try:
        summary = predict_file(
            run_dir, data, out, keep=columns, fusion=fusion, batch_size=batch_size,
            progress=True, warn=_echo, sep=sep,
        )  # fmt: skip
    except MTLRecError as exc:
        _fail(exc)
    rate = summary.rows / max(summary.seconds, 1e-9)
    console.print(
        f"wrote {summary.rows:,} rows x {len(summary.columns)} columns to {summary.out} "
        f"({rate:,.0f} rows/s): {', '.join(summary.columns)}",
        highlight=False,
    )


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories to compare")],
    split: Annotated[str, typer.Option(help="valid or test")] = "test",
) -> None:
    """Per-task metrics of several runs side by side."""
    if split not in ("valid", "test"):
        _fail(MTLRecError(f"--split {split!r}: choose valid or test"))
    table = Table(title=f"{split} metrics")
    table.add_column("run")
    rows = []
    columns: list[str] = []
    for run in run_dirs:
        path = run / "metrics.json"
        if not path.exists():
            _fail(MTLRecError(f"{path}: not found (is {run} a finished run?)"))
        try:
            metrics = json.loads(path.read_text()).get(split) or {}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            _fail(MTLRecError(f"{path}: not a metrics file ({first_line(exc)})"))
        if not isinstance(metrics, dict) or not all(isinstance(m, dict) for m in metrics.values()):
            _fail(MTLRecError(f"{path}: not a metrics file ({split!r} is not task -> metrics)"))
        flat = {f"{t} {k}": v for t, m in metrics.items() for k, v in m.items() if k != "rows"}
        columns += [c for c in flat if c not in columns]
        rows.append((run.name, flat))
    for c in columns:
        table.add_column(c, justify="right")
    for name, flat in rows:
        table.add_row(name, *(_fmt(flat.get(c)) for c in columns))
    console.print(table)


@app.command()
def reproduce(
    run_dirs: Annotated[list[Path], typer.Argument(help="Finished run directories")],
    epochs: Annotated[int, typer.Option(help="How many leading epochs to train again")] = 1,
) -> None:
    """Train each run's first epochs again from its config and seed; check they match bit for bit.

    Exit status 0 when every run reproduces, 1 when any differs (the first differing figure is
    printed), 2 on an unusable run directory."""
    from mtlrec.train.replay import replay_run

    differs = False
    for run in run_dirs:
        err.print(f"replaying {epochs} epoch(s) of {run} ...", highlight=False)
        try:
            result = replay_run(run, epochs=epochs)
        except MTLRecError as exc:
            _fail(exc)
        differs |= not result.identical
        mark = "[green]ok[/green]" if result.identical else "[red]DIFFERS[/red]"
        console.print(f"{mark} {run}: {result.summary()}", highlight=False, soft_wrap=True)
    if differs:
        raise typer.Exit(1)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by 'mtlrec train'")],
    baseline: Annotated[
        Path | None,
        typer.Option(help="A single-task run on the same data, to detect negative transfer"),
    ] = None,
) -> None:
    """Plots and a plain verdict (conflict, gate collapse, transfer) in RUN_DIR/report/."""
    from mtlrec.report import write_report

    try:
        verdict = write_report(run_dir, baseline)
    except MTLRecError as exc:
        _fail(exc)
    typer.echo(verdict.rstrip())
    console.print(f"wrote {run_dir / 'report'}", highlight=False)


@app.command("list")
def list_(
    what: Annotated[str, typer.Argument(help="models, datasets or balancers")],
) -> None:
    """Print registered names, one per line (a tab and a description follow)."""
    if what == "models":
        from mtlrec.models import describe_models as describe
    elif what == "datasets":
        from mtlrec.data.datasets import describe_datasets as describe
    elif what == "balancers":
        from mtlrec.balance import describe_balancers as describe
    else:
        _fail(MTLRecError(f"cannot list {what!r}; choose models, datasets or balancers"))
    for name, text in describe().items():
        sys.stdout.write(f"{name}\t{text}\n")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by 'mtlrec train'")],
    format_: Annotated[
        str, typer.Option("--format", "-f", help="torchscript or onnx")
    ] = "torchscript",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Folder to write (RUN_DIR/export-FORMAT)")
    ] = None,
    fusion: Annotated[
        Path | None, typer.Option(help="YAML with a 'serve:' mapping to ship with the model")
    ] = None,
) -> None:
    """Export a run as a self-contained folder (graph, encoder, schema, fusion, metadata)."""
    from mtlrec.serve.export import export_run

    try:
        target = export_run(run_dir, format_, out, fusion)
    except MTLRecError as exc:
        _fail(exc)
    console.print(f"wrote {target}", highlight=False)


@app.command()
def serve(
    run_dir: Annotated[Path, typer.Argument(help="A run directory or an 'mtlrec export' folder")],
    host: Annotated[str, typer.Option(help="Address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind")] = 8000,
    fusion: Annotated[
        Path | None, typer.Option(help="YAML with a 'serve:' mapping (fusion, limits)")
    ] = None,
    threads: Annotated[int, typer.Option(help="Intra-op threads for the model")] = 1,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Serve POST /score, GET /health and GET /metadata over HTTP."""
    try:
        from mtlrec.serve.app import serve as run_server

        run_server(run_dir, host, port, fusion, threads, log_level)
    except ImportError as exc:
        _fail(MTLRecError(f"serving needs the extras ({exc.name}): pip install 'mtlrec[serve]'"))
    except MTLRecError as exc:
        _fail(exc)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _print_metrics(metrics: dict[str, Any], title: str) -> None:
    for split, tasks in metrics.items():
        if not tasks:
            continue
        keys = [k for k in dict.fromkeys(k for m in tasks.values() for k in m) if k != "rows"]
        table = Table(title=f"{title} — {split}")
        table.add_column("task")
        for k in keys + ["rows"]:
            table.add_column(k, justify="right")
        for task, m in tasks.items():
            table.add_row(task, *(_fmt(m.get(k)) for k in keys + ["rows"]))
        console.print(table)


def _unwrap_help() -> None:
    """Typer prints a docstring's line breaks as they are, so a paragraph wrapped at 100 columns
    in the source broke mid-sentence in ``--help``: join each paragraph into one line."""
    for info in app.registered_commands:
        doc = info.callback.__doc__ if info.callback else None
        if doc:
            paragraphs = inspect.cleandoc(doc).split("\n\n")
            info.callback.__doc__ = "\n\n".join(" ".join(p.split("\n")) for p in paragraphs)


_unwrap_help()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        app()
        return
    # Under torchrun: leave without running C++ static destructors. A rank that exits while
    # its peer is still shutting gloo down can otherwise abort at exit ("terminate called
    # without an active exception") after all its work is done and written.
    try:
        app()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
