"""The `streambars` command: argument parsing and output formatting only.

Every subcommand turns its flags into settings overrides (dotted config keys) or plain
arguments and calls one library function; exit codes: 0 success, 1 the work failed (or
validation found errors), 2 bad arguments or configuration, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from .startup import (
    default_numba_cache_dir,
    ignore_stop_signals,
    interrupt_on_stop_signals,
    redeliver_later,
)
from .tables import format_table

if TYPE_CHECKING:  # pragma: no cover
    from .backfill import BackfillOptions
    from .config import Settings

Handler = Callable[[argparse.Namespace, "Settings"], int]


DESCRIPTION = """\
Turn Databento market data into validated OHLCV bars at every timeframe, stored in
HDF5 files that analysis code can read while they are being written.

  streambars demo                      run the whole pipeline on the bundled sample
  streambars check [--live]            test the API key and the connection to Databento
  streambars backfill --start ...      download history month by month into the store
  streambars run                       the live daemon (systemd Type=notify)
  streambars inspect | export | validate | compact   work with the store
  streambars plot --symbol ... --out x.png   candlesticks with volume

Timeframes are a number and a unit: s, min (or m, as in Databento's ohlcv-1m), h, d;
e.g. 15s, 1min = 1m, 4h, 1d. Dates: --start is inclusive, --end exclusive.
"""


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration")
    g.add_argument("--config", "-c", metavar="TOML", help="configuration file (see config/)")
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any config key, value in TOML syntax (repeatable), "
        "e.g. --set bars.timeframes='[\"1s\",\"1min\"]'",
    )
    g.add_argument("--store", metavar="DIR", help="store directory (config store.path)")
    g.add_argument("--env-file", default=".env", metavar="PATH", help="where to look for DATABENTO_API_KEY")
    g.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    g.add_argument("--log-format", choices=("auto", "json", "console"))


def _source_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="Databento dataset, e.g. GLBX.MDP3 (config databento.dataset)")
    g.add_argument("--symbols", help="comma-separated symbols (config databento.symbols)")
    g.add_argument("--schema", choices=("ohlcv-1s", "ohlcv-1m", "trades"), help="input schema")
    g.add_argument(
        "--stype-in", choices=("raw_symbol", "continuous", "parent", "instrument_id"), help="symbology"
    )
    g.add_argument("--timeframes", help="comma-separated timeframes, e.g. 1s,15s,1min,1h,1d "
                   "(1m = 1min, as in Databento's ohlcv-1m)")
    g.add_argument("--session", help="daily session start, e.g. '17:00 America/Chicago'; default 'auto': "
                   "by dataset (GLBX.MDP3 17:00 America/Chicago, US equities 00:00 America/New_York, ...)")


_FLAG_TO_KEY = {
    "store": "store.path",
    "log_level": "logging.level",
    "log_format": "logging.format",
    "dataset": "databento.dataset",
    "symbols": "databento.symbols",
    "schema": "databento.schema",
    "stype_in": "databento.stype_in",
    "timeframes": "bars.timeframes",
    "session": "bars.session",
    "historical_gateway": "databento.historical_gateway",
    "live_gateway": "databento.live_gateway",
    "max_cost": "databento.max_cost",
    "metrics_port": "live.metrics_port",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streambars", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="run the full pipeline on the bundled sample into ./store",
                       description="Backfill the bundled sample (no API key, no network) into the "
                       "store, then print the inspect table and the last 1min bars.")
    _common(p)
    # The demo shows its own summary: info logs would interleave with its table (raise with
    # --log-level info to see them).
    p.set_defaults(handler=_cmd_demo, log_level="warning")

    p = sub.add_parser("check", help="test the API key and the connection to Databento",
                       description="Verify the API key (DATABENTO_API_KEY from the environment or "
                       "--env-file) against Databento's Historical API (metadata.list_datasets: "
                       "free) and, with --live or --live-gateway, authenticate a Live session and "
                       "close it before anything streams (no cost). Prints the datasets the key can "
                       "use. Exit codes: 0 ok, 2 key (or dataset) refused, 1 gateway unreachable.")
    _common(p)
    p.add_argument("--dataset", help="dataset for the Live check (config databento.dataset)")
    p.add_argument("--historical-gateway", metavar="URL", help="Historical API base URL")
    p.add_argument("--live-gateway", metavar="HOST:PORT", help="also check this Live gateway")
    p.add_argument("--live", action="store_true", help="also check Live (the configured or default gateway)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="give up on a gateway after this long (default 5)")
    p.set_defaults(handler=_cmd_check)

    p = sub.add_parser("backfill", help="download history month by month into the store",
                       description="Download Databento history (or read DBN files) month by month, "
                       "aggregate every timeframe in one pass and append to the store. Resume-safe: "
                       "months already in the raw archive are never downloaded twice.")
    _common(p)
    _source_flags(p)
    p.add_argument("--start", help="first day (YYYY-MM-DD or YYYY-MM), inclusive")
    p.add_argument("--end", help="end day (YYYY-MM-DD or YYYY-MM), exclusive; with --from-dbn: declare "
                   "the files complete up to it (closes the bars that end by then)")
    p.add_argument("--historical-gateway", metavar="URL", help="Historical API base URL")
    p.add_argument("--max-cost", type=float, metavar="USD", help="stop if the cost is above this")
    p.add_argument("--yes", action="store_true", help="proceed even above --max-cost")
    p.add_argument("--dry-run", action="store_true", help="print the cost and plan, download nothing")
    p.add_argument("--force", action="store_true", help="re-download months already archived")
    p.add_argument("--from-dbn", nargs="+", metavar="PATH", help="ingest DBN files instead (no API key); a directory means the "
                   "*.dbn / *.dbn.zst files directly in it")
    g = p.add_argument_group("scale-out (pip install '.[cluster]'; see docs/cluster.md)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--scheduler", metavar="ADDRESS", help="run the symbols on an existing Dask cluster, "
                   "e.g. tcp://10.0.0.5:8786 (config cluster.scheduler); the store must be on a "
                   "filesystem every worker mounts at the same path")
    x.add_argument("--workers", type=int, metavar="N", help="run the symbols on a local cluster of N "
                   "single-threaded worker processes (config cluster.workers)")
    p.set_defaults(handler=_cmd_backfill)

    p = sub.add_parser("run", help="the live daemon (Databento Live -> store)",
                       description="Subscribe to Databento Live and append every timeframe to the "
                       "store as bars close. Speaks the systemd notify protocol; SIGTERM drains and "
                       "exits 0, SIGHUP reopens the log file and reloads the symbol list.")
    _common(p)
    _source_flags(p)
    p.add_argument("--live-gateway", metavar="HOST:PORT", help="Live gateway (config databento.live_gateway)")
    p.add_argument("--historical-gateway", metavar="URL", help="Historical API base URL (gap fill)")
    p.add_argument("--metrics-port", type=int, metavar="PORT", help="Prometheus endpoint on 127.0.0.1 (0: off)")
    p.set_defaults(handler=_cmd_run)

    p = sub.add_parser("inspect", help="table of what the store holds",
                       description="List datasets, symbols and timeframes in the store with rows, "
                       "first and last bar and file size.")
    _common(p)
    p.add_argument("--symbol", action="append", dest="symbols_sel", metavar="PATTERN",
                   help="only these symbols: a name or glob ('ES*'); repeatable or a comma list")
    p.add_argument("--timeframe", action="append", dest="timeframes_sel", metavar="PATTERN",
                   help="only these timeframes (e.g. 1min, '*s'); repeatable or a comma list")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout instead of the table")
    p.set_defaults(handler=_cmd_inspect)

    p = sub.add_parser("export", help="write bars to CSV or Parquet",
                       description="Export bars of one or more symbols and timeframes to CSV (ISO-8601 "
                       "timestamps, decimal prices), gzipped CSV or Parquet: to one file, to stdout "
                       "(--out -), to a directory, or as a tree of per-month files (--layout).")
    _common(p)
    p.add_argument("--dataset", help="dataset (needed when the store holds several)")
    p.add_argument("--symbol", action="append", required=True, metavar="S",
                   help="symbol(s): repeatable or a comma list; 'all' for every symbol")
    p.add_argument("--timeframe", action="append", required=True, metavar="TF",
                   help="timeframe(s), e.g. 15s,30s,1min (1m = 1min): repeatable or a comma list; 'all' for every one stored")
    p.add_argument("--start", help="first bar (inclusive; ISO-8601, UTC unless --tz or an offset)")
    p.add_argument("--end", help="end (exclusive)")
    p.add_argument("--format", metavar="{csv,csv.gz,parquet}",
                   help="default: from the --out (or --layout) suffix .csv, .csv.gz, .parquet")
    p.add_argument("--layout", metavar="TEMPLATE",
                   help="files under --out by template with {DATASET} {SYMBOL} {TF} {YYYY} {MM} {DD}, one file "
                   "per series and period; presets: symbol-month = {SYMBOL}/{SYMBOL}_{YYYY}_{MM}.csv, "
                   "timeframe-month = {TF}/{SYMBOL}_{YYYY}_{MM}_{TF}.csv")
    p.add_argument("--split", choices=("none", "monthly"), default="none",
                   help="monthly: the layout {SYMBOL}_{YYYY}_{MM}_{TF}.csv")
    p.add_argument("--tz", metavar="ZONE",
                   help="write times in this zone (e.g. America/New_York) and cut periods there (default UTC)")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="a file, - for CSV on stdout, or a directory (existing or ending in /)")
    p.set_defaults(handler=_cmd_export)

    p = sub.add_parser("validate", help="check a store against every rule",
                       description="Validate stored bars: OHLC relations, prices, volume, timestamps, "
                       "cross-timeframe consistency, gaps in trading hours, price jumps, volume "
                       "outliers. Exit codes: 0 clean (warnings allowed), 1 an error-severity rule "
                       "failed, 2 bad arguments or unreadable store.")
    _common(p)
    p.add_argument("--dataset")
    p.add_argument("--symbol", action="append", dest="symbols_sel", metavar="S")
    p.add_argument("--timeframe", action="append", dest="timeframes_sel", metavar="T",
                   help="only these timeframes (repeatable or a comma list; 1m = 1min)")
    p.add_argument("--start")
    p.add_argument("--end")
    p.add_argument("--report", metavar="PATH", help="text report (default <store>/logs/validate-*.txt)")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="JSON report")
    p.add_argument("--html", dest="html_path", metavar="PATH", help="self-contained HTML page: the "
                   "findings and a chart around each rule's first offenders (needs the plot extra: pip install '.[plot]')")
    p.add_argument("--reference", action="store_true",
                   help="also compare 1min/1h/1d with Databento's own ohlcv-1m/1h/1d")
    p.set_defaults(handler=_cmd_validate)

    p = sub.add_parser("plot", help="draw candlesticks with volume to a PNG",
                       description="Draw one symbol's bars of one timeframe as candlesticks with a "
                       "volume panel (needs pip install '.[plot]'). Long ranges are drawn "
                       "with coarser candles (a stored coarser timeframe, else bars merged in "
                       "memory); the title says which.")
    _common(p)
    p.add_argument("--dataset", help="dataset (needed when several hold the symbol)")
    p.add_argument("--symbol", required=True)
    p.add_argument("--timeframe", required=True, help="e.g. 1min (or 1m), 5min, 1h, 1d")
    p.add_argument("--start", help="first bar time (ISO-8601, UTC when no zone), inclusive")
    p.add_argument("--end", help="end time, exclusive")
    p.add_argument("--tz", default="UTC", help="time zone of the time axis, e.g. America/New_York (default UTC)")
    p.add_argument("--max-candles", type=int, metavar="N",
                   help="draw coarser candles above N (default 600; 0: every bar)")
    p.add_argument("--out", required=True, metavar="FILE.png", help="picture file (.png, .svg or .pdf)")
    p.set_defaults(handler=_cmd_plot)

    p = sub.add_parser("compact", help="rewrite closed files compressed, atomically",
                       description="Rewrite store files (not being written) with compression into a "
                       "temporary file and rename it over the original.")
    _common(p)
    p.add_argument("paths", nargs="*", help="files to compact (default: every file in the store)")
    p.add_argument("--compression", choices=("gzip", "lzf"), default="gzip")
    p.set_defaults(handler=_cmd_compact)

    p = sub.add_parser("repair", help="rebuild a damaged store file from the raw archive",
                       description="Rebuild one store file from the raw archive (every input it was "
                       "built from is kept there). The damaged file is kept beside it as "
                       "<name>.h5.damaged-<UTC>. Its timeframes, session and ledger are read from the "
                       "damaged file when they can be, else from the configuration and the archive.")
    _common(p)
    _source_flags(p)
    p.add_argument("file", help="the store file, <store>/<dataset>/<symbol>.h5")
    p.set_defaults(handler=_cmd_repair)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    from .config import load_settings, parse_override

    overrides: dict[str, Any] = {}
    for flag, key in _FLAG_TO_KEY.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    for text in args.overrides:
        key, value = parse_override(text)
        overrides[key] = value
    # One flag picks where backfill runs, whatever the config file said about the other.
    if getattr(args, "scheduler", None) is not None:
        overrides.update({"cluster.scheduler": args.scheduler, "cluster.workers": 0})
    if getattr(args, "workers", None) is not None:
        overrides.update({"cluster.workers": args.workers, "cluster.scheduler": ""})
    return load_settings(args.config, overrides)


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from .demo import run_demo

    return run_demo(settings, out=sys.stdout)


def _cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    from .check import run_check

    live = args.live or args.live_gateway is not None
    return run_check(settings, env_file=args.env_file, live=live, timeout=args.timeout, out=sys.stdout)


def _cmd_backfill(args: argparse.Namespace, settings: Settings) -> int:
    from .backfill import BackfillOptions

    options = BackfillOptions(
        start=args.start,
        end=args.end,
        yes=args.yes,
        dry_run=args.dry_run,
        force=args.force,
        from_dbn=tuple(args.from_dbn or ()),
        env_file=args.env_file,
    )
    return run_backfill(settings, options, out=sys.stdout)


def run_backfill(settings: Settings, options: BackfillOptions, out: TextIO = sys.stdout) -> int:
    """The command: plan, check cost, run (here or on a Dask cluster), print the summary.
    Returns the exit code. (Here, above both backfill and cluster: neither imports the other.)"""
    from .backfill import execute, plan_backfill, print_summary

    cluster = settings.cluster.scheduler or settings.cluster.workers
    if cluster:
        from .cluster import require_distributed

        require_distributed()  # before planning: no cost query for a run that cannot start
    planned = plan_backfill(settings, options, out)
    if planned is None:  # dry run
        return 0
    plan, client = planned
    if cluster:
        from .cluster import run_on_cluster

        return run_on_cluster(plan, out=out)
    result = execute(plan, client=client)
    print_summary(result, out)
    return 0


def _cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from .daemon import run_daemon

    return run_daemon(settings, env_file=args.env_file)


def _split_list(values: Sequence[str] | None) -> list[str]:
    """Repeated flags and comma lists -> one list."""
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def _cmd_inspect(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from .errors import UsageError
    from .store import inspect_store

    symbols, timeframes = _split_list(args.symbols_sel), _split_list(args.timeframes_sel)
    rows = inspect_store(settings.store.path, symbols or None, timeframes or None, machine=args.json)
    if not rows and (symbols or timeframes):
        raise UsageError(f"nothing in {settings.store.path} matches --symbol {','.join(symbols) or '*'} "
                         f"--timeframe {','.join(timeframes) or '*'} (see `streambars inspect`)")
    if args.json:
        print(json.dumps({"store": str(settings.store.path), "series": rows}, indent=1))
    else:
        print(format_table(rows))
    bad = [r for r in rows if r.get("status", "ok") != "ok"]
    if bad:  # damaged (or unreadable) files are bad input: named in the table, exit 2
        print(f"streambars: {len(bad)} file(s) in {settings.store.path} cannot be read (see status)", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from .export import STDOUT, export_bars
    from .observe import Progress, ProgressDisplay
    from .records import BAR_DTYPE
    from .timeutil import check_tz

    if args.tz is not None:  # named as the user gave it (export_bars' own message says tz=)
        check_tz(args.tz, "--tz")
    progress = Progress(noun="rows", units_noun="files", count_bars=False)
    # CSV on a terminal's stdout: a bar there would be drawn among the rows
    with ProgressDisplay(progress, "export", show=not (args.out == STDOUT and sys.stdout.isatty())) as display:
        written = export_bars(
            settings.store.path,
            symbol=_split_list(args.symbol),
            timeframe=_split_list(args.timeframe),
            dataset=args.dataset,
            start=args.start,
            end=args.end,
            fmt=args.format,
            split=args.split,
            layout=args.layout,
            tz=args.tz,
            out=args.out,
            on_rows=lambda n: progress.add(records=n, nbytes=n * BAR_DTYPE.itemsize),
            on_total=lambda n: setattr(progress, "total_records", n),
        )
        progress.units_total = progress.units_done = len(written)
        display.update()
    report = sys.stderr if args.out == STDOUT else sys.stdout  # stdout carries the CSV alone
    for path, rows in written:
        print(f"{path}\t{rows} rows", file=report)
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace, settings: Settings) -> int:
    from .validate import run_validate

    return run_validate(
        settings,
        dataset=args.dataset,
        symbols=args.symbols_sel,
        timeframes=args.timeframes_sel,
        start=args.start,
        end=args.end,
        report_path=args.report,
        json_path=args.json_path,
        html_path=args.html_path,
        reference=args.reference,
        env_file=args.env_file,
        out=sys.stdout,
    )


def _cmd_plot(args: argparse.Namespace, settings: Settings) -> int:
    from .plot import plot_to_file

    path, candles = plot_to_file(
        settings.store.path, symbol=args.symbol, timeframe=args.timeframe, out=args.out,
        start=args.start, end=args.end, dataset=args.dataset, tz=args.tz, max_candles=args.max_candles,
    )  # fmt: skip
    print(f"{path}\t{candles.bars:,} bars, {len(candles):,} candles ({candles.label})")
    return EXIT_OK


def _cmd_compact(args: argparse.Namespace, settings: Settings) -> int:
    from .observe import Progress, ProgressDisplay
    from .store import compact_store

    progress = Progress(noun="files", count_bars=False)
    with ProgressDisplay(progress, "compact"):
        for path, before, after in compact_store(settings.store.path, args.paths, args.compression, progress):
            print(f"{path}\t{before:,} -> {after:,} bytes")
    return EXIT_OK


def _cmd_repair(args: argparse.Namespace, settings: Settings) -> int:
    from .repair import repair_file

    return repair_file(settings, args.file, out=sys.stdout)


def console_main() -> None:
    """The process entry point (``streambars``, ``python -m streambars``): run, then exit.

    Process-wide set-up lives here, not in :func:`main` (which tests call in-process):
    SIGTERM/SIGINT raise :class:`~streambars.errors.Interrupted` (a stop during the start-up
    of `run` too; once running, the daemon's own receivers take over: drain, exit 0), and
    tracebacks printed outside the main flow become log events.

    A failed run exits with ``os._exit`` once its files are closed and its line printed:
    after a write failure HDF5 can leave objects that crash the interpreter's final garbage
    collection (SIGSEGV, seen after EFBIG), which would replace the documented exit code by
    -11 and add "Exception ignored" tracebacks. Success takes the normal path."""
    import os

    interrupt_on_stop_signals()
    _quiet_background_errors()
    code = main()
    if code != EXIT_OK:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)
    # The work is done: a stop signal now changes nothing (it would only interrupt the
    # interpreter's teardown), and objects in reference cycles (readers) are finalised
    # while the modules they need still exist, not as "Exception ignored" at shutdown.
    ignore_stop_signals()
    gc.collect()
    # What is left is live (modules, numba's types and dispatchers: ~120k objects): frozen,
    # the teardown's own collections skip it instead of walking it again several times
    # (measured ~0.3-0.6 s of a backfill process's exit here).
    gc.freeze()
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        default_numba_cache_dir()
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("streambars: interrupted while starting; nothing was done", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.version:
        from .version import __version__

        print(__version__)
        return EXIT_OK
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_USAGE
    return run_handler(handler, args)


def _flatten(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        return [x for sub in e.exceptions for x in _flatten(sub)]
    return [e]


def _user_error(e: BaseException) -> BaseException:
    """The error to report for ``e``: the most telling member of an exception group (an
    interrupt wins: the user asked to stop, the rest is its consequence)."""
    if not isinstance(e, BaseExceptionGroup):
        return e
    flat = _flatten(e)
    for x in flat:
        if isinstance(x, KeyboardInterrupt):
            return x
    from .pipeline import most_telling_error

    return most_telling_error(e)


def describe_os_error(e: OSError) -> str:
    """'No space left on device (errno 28): /path' — the OS's words, the file and the number."""
    what = e.strerror or str(e) or type(e).__name__
    where = ": ".join(str(f) for f in (e.filename, e.filename2) if f)
    code = f" (errno {e.errno})" if e.errno else ""
    return f"{what}{code}{': ' + where if where else ''}"


def _exit_for(e: BaseException) -> tuple[int, str]:
    """Exit code and the one line to print for an exception that ended a command."""
    from .errors import StreambarsError

    if isinstance(e, KeyboardInterrupt):
        name = getattr(e, "signame", "SIGINT")
        return EXIT_INTERRUPTED, f"interrupted ({name}); what was flushed is kept, rerun to resume"
    if isinstance(e, StreambarsError):
        return e.exit_code, str(e)
    if isinstance(e, OSError):
        return EXIT_FAILED, f"{describe_os_error(e)}; fix the cause and rerun"
    if isinstance(e, MemoryError):
        return EXIT_FAILED, "out of memory; give the process more memory or fewer symbols per run"
    detail = " ".join(str(e).split()) or "(no message)"
    how = "report it with the traceback above" if _debug else \
        "rerun with --log-level debug for the traceback and report it"
    return EXIT_FAILED, f"internal error {type(e).__name__}: {detail[:300]} (a bug: {how})"


def run_handler(handler: Handler, args: argparse.Namespace) -> int:
    """Load settings (before any work), set up logging, run the command; map every exception
    onto an exit code and one line ``streambars: ...`` on stderr (secrets scrubbed). No
    traceback reaches a user: it is printed above that line only with ``--log-level debug``."""
    global _debug
    debug = _debug = getattr(args, "log_level", None) == "debug"
    try:
        from .observe import configure_logging

        settings = _settings(args)
        debug = _debug = settings.logging.level == "debug"
        configure_logging(settings.logging.level, settings.logging.format)
        return handler(args, settings)
    except BaseException as caught:  # noqa: BLE001 - the last line of defence
        if isinstance(caught, SystemExit | GeneratorExit):
            raise
        e = _user_error(caught)
        code, line = _exit_for(e)
        try:
            if debug and not isinstance(e, KeyboardInterrupt):
                import traceback

                sys.stderr.write(_scrub("".join(traceback.format_exception(caught))))
            print(f"streambars: {_scrub(line)}", file=sys.stderr, flush=True)
        except (OSError, ValueError):  # stderr closed or broken: the exit code still says it
            pass
        return code


_debug = False  # --log-level debug (or logging.level) of the running command


def _quiet_background_errors() -> None:
    """Errors Python would print as tracebacks outside the main flow — in a ``__del__`` or a
    C extension's dealloc (printed through ``sys.excepthook``) (h5py closing an object of a file whose write failed: "Exception
    ignored in ...") or in a thread — become one log event (JSON off a terminal); the
    traceback only with --log-level debug. What failed is reported by the main flow."""

    last: list[BaseException | None] = [None]

    def log_it(where: str, exc: BaseException | None, tb: Any) -> None:
        if exc is not None and exc is last[0]:  # Cython prints, then reports unraisable: once
            return
        last[0] = exc
        try:
            from .observe import get_logger

            fields: dict[str, Any] = {"where": where, "error": _scrub(f"{type(exc).__name__}: {exc}")}
            if _debug and exc is not None:
                import traceback

                fields["traceback"] = _scrub("".join(traceback.format_exception(type(exc), exc, tb)))
            get_logger("streambars").warning("error ignored outside the main flow", **fields)
        except Exception:  # noqa: BLE001, S110 - reporting must never raise from a hook
            pass

    def unraisable(u: Any) -> None:
        if isinstance(u.exc_value, KeyboardInterrupt):
            # The stop landed where Python swallows exceptions (a finaliser the handler did
            # not recognise): deliver it again to the main flow, once this has returned.
            import signal

            interrupt_on_stop_signals()
            redeliver_later(getattr(signal, getattr(u.exc_value, "signame", "SIGINT"), signal.SIGINT))
            return
        log_it(str(u.object) if u.object is not None else (u.err_msg or "cleanup"), u.exc_value, u.exc_traceback)

    def in_thread(a: threading.ExceptHookArgs) -> None:
        if a.exc_type is SystemExit:
            return
        log_it(f"thread {a.thread.name if a.thread else '?'}", a.exc_value, a.exc_traceback)

    def printed(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        # Cython extensions (h5py's dealloc) print through sys.excepthook via PyErr_PrintEx.
        log_it("extension cleanup", exc, tb)

    sys.unraisablehook = unraisable
    threading.excepthook = in_thread
    sys.excepthook = printed


def _scrub(text: str) -> str:
    """observe.scrub, even when the interrupt came while observe was being imported."""
    try:
        from .observe import scrub
    except Exception:  # noqa: BLE001 - a half-imported structlog must not hide the message
        import re

        return re.sub(r"db-[A-Za-z0-9]{20,}", "<redacted>", text)
    return scrub(text)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
