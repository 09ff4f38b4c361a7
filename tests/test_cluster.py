"""`backfill --workers N | --scheduler ADDRESS`: the same store as one process, bar for bar,
through a worker killed mid-symbol, Ctrl-C, a locked file; the API key never travels.

The real databento client in the workers talks HTTPS to the fake Historical gateway (the
workers inherit its CA and the key through the environment, as a local cluster's do). Every
cluster here listens on 127.0.0.1 only."""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from streambars.backfill import BackfillOptions, plan_backfill  # noqa: E402
from streambars.cli import _settings, build_parser, main  # noqa: E402
from streambars.cluster import (  # noqa: E402
    Board,
    StoreNotVisibleError,
    SymbolTask,
    run_on_cluster,
    run_symbol,
)
from streambars.config import ConfigError, load_settings  # noqa: E402
from streambars.store.layout import file_path  # noqa: E402
from streambars.store.lock import FileLock  # noqa: E402

from .fakes import TEST_KEY  # noqa: E402
from .fakes.historical import FakeHistorical  # noqa: E402
from .test_backfill import (  # noqa: E402
    DATASET,
    TIMEFRAMES,
    _args,
    _assert_store_matches,
    _snapshot,
    build_market,
)

REPO = Path(__file__).resolve().parents[1]
SYMBOLS = ("ES.c.0", "NQ.c.0")


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    """One fake market for the module: workers started once trust its CA."""
    fake = FakeHistorical(TEST_KEY).start(cert_dir=tmp_path_factory.mktemp("fake-ca"))
    build_market(fake)
    saved = {k: os.environ.get(k) for k in (*fake.env, "DATABENTO_API_KEY")}
    os.environ.update(fake.env)
    os.environ["DATABENTO_API_KEY"] = TEST_KEY  # what a worker reads (its own environment)
    from streambars.observe import register_secret

    register_secret(TEST_KEY)
    try:
        yield fake
    finally:
        fake.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def client(market):
    """A local cluster of two single-threaded worker processes, loopback only."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def reference(market, tmp_path_factory):
    """The single-process store every cluster run must equal."""
    store = tmp_path_factory.mktemp("ref") / "store"
    assert main(_args(store, market, "--yes")) == 0
    return _snapshot(store)


def _plan(store: Path, market, *extra: str):
    args = build_parser().parse_args(_args(store, market, "--yes", *extra))
    settings = _settings(args)
    options = BackfillOptions(start=args.start, end=args.end, yes=True, env_file=args.env_file)
    planned = plan_backfill(settings, options, out=io.StringIO())
    assert planned is not None
    return planned[0]


def _task_reprs(dask_scheduler) -> list[str]:
    """Each task as the scheduler holds it: its repr, its arguments' reprs, its pickled bytes."""
    import cloudpickle

    out = []
    for ts in dask_scheduler.tasks.values():
        spec = ts.run_spec
        out.append(" ".join([repr(spec), repr(getattr(spec, "args", "")), repr(getattr(spec, "kwargs", "")),
                             repr(cloudpickle.dumps(spec))]))
    return out


def _assert_equal(store: Path, reference) -> None:
    got = _snapshot(store)
    assert set(got) == set(reference)
    for key, rows in reference.items():
        assert len(got[key]) == len(rows), key
        np.testing.assert_array_equal(got[key], rows, err_msg=str(key))


def test_local_cluster_equals_one_process_and_the_key_never_travels(market, client, reference, tmp_path, capfd):
    store = tmp_path / "store"
    plan = _plan(store, market)
    reprs: list[str] = []
    stop = threading.Event()

    def watch_scheduler() -> None:  # what the dashboard and the scheduler's logs would show
        while not stop.is_set():
            reprs.extend(client.run_on_scheduler(_task_reprs))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_scheduler)
    watcher.start()
    out = tmp_path / "out.txt"
    try:
        with open(out, "w") as f:
            assert run_on_cluster(plan, out=f, client=client) == 0
    finally:
        stop.set()
        watcher.join()
    _assert_equal(store, reference)
    _assert_store_matches(store, market)
    text = out.read_text()
    rows = {line.split()[0]: line.split()[1] for line in text.splitlines() if line.split()[:1] in (["ES.c.0"], ["NQ.c.0"])}
    assert rows == {"ES.c.0": "ok", "NQ.c.0": "ok"}, text
    assert any("SymbolTask('ES.c.0'" in r for r in reprs), reprs[:5]
    assert not any(TEST_KEY in r for r in reprs)
    assert "done: " in text and "bars per timeframe" in text
    # What is shipped to a worker (and shown on the dashboard) holds no key.
    task = SymbolTask("ES.c.0", plan.for_symbols(["ES.c.0"]), "t" * 32, str(store / ".m"))
    assert TEST_KEY not in repr(task) and TEST_KEY.encode() not in pickle.dumps(task)
    import cloudpickle

    assert TEST_KEY.encode() not in cloudpickle.dumps(task)
    # Nor does any worker log: Dask's own records, or what the workers wrote to stderr.
    logs = json.dumps(client.get_worker_logs()) + json.dumps(client.get_scheduler_logs())
    assert TEST_KEY not in logs
    captured = capfd.readouterr()
    assert TEST_KEY not in captured.out + captured.err


def test_a_worker_killed_mid_symbol_is_retried_elsewhere_and_the_store_is_the_same(
        market, client, reference, tmp_path):
    store = tmp_path / "store"
    plan = _plan(store, market)
    killed: list[dict] = []
    attempts: dict[str, set[str]] = {}

    def on_event(msg):
        attempts.setdefault(msg["symbol"], set()).add(msg["attempt"])
        if msg["kind"] == "item" and not killed:  # a month done, two still to go
            killed.append(msg)
            os.kill(msg["pid"], signal.SIGKILL)

    market.latency = 0.5  # each month's download takes a while: the kill lands mid-symbol
    try:
        with open(os.devnull, "w") as f:
            assert run_on_cluster(plan, out=f, client=client, on_event=on_event) == 0
    finally:
        market.latency = 0.0
    assert killed
    victim = killed[0]["symbol"]
    assert len(attempts[victim]) >= 2  # the task ran again, on a live worker
    _assert_equal(store, reference)
    client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed one


def test_a_failed_symbol_is_named_and_the_others_are_stored(market, client, reference, tmp_path, capsys):
    store = tmp_path / "store"
    jan = _args(store, market, "--yes")
    jan[jan.index("--end") + 1] = "2024-02-01"
    assert main(jan) == 0
    plan = _plan(store, market)
    with FileLock(file_path(store, DATASET, "ES.c.0")):  # another writer holds ES
        from streambars.cluster import SymbolsFailed

        with pytest.raises(SymbolsFailed) as e:
            run_on_cluster(plan, out=sys.stdout, client=client)
    assert "1 of 2 symbol(s) failed: ES.c.0" in str(e.value)
    out = capsys.readouterr().out
    assert "FAILED" in out and "NQ.c.0" in out
    got = _snapshot(store)
    for tf in TIMEFRAMES:
        np.testing.assert_array_equal(got[("NQ.c.0", tf)], reference[("NQ.c.0", tf)])


def test_a_worker_that_does_not_see_the_store_fails_the_task_clearly(market, tmp_path):
    plan = _plan(tmp_path / "store", market)
    task = SymbolTask("ES.c.0", plan.for_symbols(["ES.c.0"]), "a" * 32, str(tmp_path / "store" / ".marker"))
    with pytest.raises(StoreNotVisibleError, match="does not see the store .*every worker mounts"):
        run_symbol(task)


def test_the_cost_guard_runs_once_before_any_cluster(market, tmp_path, capsys):
    market.cost_per_record = 1.0
    requests = len(market.requests)
    try:
        assert main(_args(tmp_path / "store", market, "--workers", "2", "--max-cost", "5")) == 1
    finally:
        market.cost_per_record = 0.0
    out, err = capsys.readouterr()
    assert "above databento.max_cost" in err and "cluster:" not in out
    assert not [r for r in market.requests[requests:] if "get_range" in r[0]]
    assert main(_args(tmp_path / "store", market, "--workers", "2", "--dry-run")) == 0
    assert "cluster:" not in capsys.readouterr().out


def test_without_dask_the_error_names_the_extra(market, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "distributed", None)
    assert main(_args(tmp_path / "store", market, "--workers", "2")) == 2
    err = capsys.readouterr().err
    assert "pip install '.[cluster]' in a checkout" in err and "Traceback" not in err


def test_board_counts_the_latest_attempt_of_each_symbol(market, tmp_path):
    board = Board(_plan(tmp_path / "store", market))
    ev = [("ES.c.0", "a1", "item", 1, 100), ("NQ.c.0", "b1", "item", 1, 50),
          ("ES.c.0", "a1", "item", 2, 180),  # then its worker died
          ("ES.c.0", "a2", "start", 0, 0), ("ES.c.0", "a2", "item", 1, 90)]
    for sym, att, kind, units, records in ev:
        board.on_event((0.0, {"symbol": sym, "attempt": att, "kind": kind, "units": units,
                              "records": records, "bars": records // 10, "label": "", "host": "h", "pid": 1}))
    p = board.update()
    assert (p.units_done, p.records, p.bars) == (2, 140, 14)
    assert board.attempts["ES.c.0"] == {"a1", "a2"}


def test_cluster_settings():
    s = load_settings(None, {"cluster.scheduler": "tcp://127.0.0.1:8786"})
    assert s.cluster.scheduler == "tcp://127.0.0.1:8786" and s.cluster.workers == 0
    with pytest.raises(ConfigError, match="cluster.workers"):
        load_settings(None, {"cluster.scheduler": "tcp://127.0.0.1:8786", "cluster.workers": 2})
    with pytest.raises(ConfigError, match="cluster.scheduler"):
        load_settings(None, {"cluster.scheduler": "udp://x"})
    # A flag wins over the config file's other choice; both flags at once are refused.
    args = build_parser().parse_args(["backfill", "--workers", "3", "--set", "cluster.scheduler='tcp://h:1'"])
    assert _settings(args).cluster == load_settings(None, {"cluster.workers": 3}).cluster
    with pytest.raises(SystemExit):
        build_parser().parse_args(["backfill", "--workers", "3", "--scheduler", "tcp://h:1"])


# ----------------------------------------------------------------------------- subprocesses


def _env(market) -> dict[str, str]:
    return {**os.environ, **market.env, "PYTHONPATH": str(REPO), "DATABENTO_API_KEY": TEST_KEY}


@pytest.mark.slow
def test_dask_scheduler_and_worker_command_lines(market, reference, tmp_path):
    """`dask scheduler` + `dask worker` as subprocesses on 127.0.0.1, `--scheduler ADDRESS`."""
    dask = Path(sys.executable).with_name("dask")
    sched_file = tmp_path / "scheduler.json"
    env = _env(market)
    logs = [open(tmp_path / "scheduler.log", "w"), open(tmp_path / "worker.log", "w")]  # noqa: SIM115
    procs = [subprocess.Popen([str(dask), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(sched_file)], env=env, stdout=logs[0], stderr=logs[0])]
    try:
        deadline = time.monotonic() + 60
        address = ""
        while not address and time.monotonic() < deadline:  # the file appears before it is written
            try:
                address = json.loads(sched_file.read_text())["address"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.1)
        assert address.startswith("tcp://127.0.0.1:")
        procs.append(subprocess.Popen(
            [str(dask), "worker", address, "--host", "127.0.0.1", "--nworkers", "2", "--nthreads", "1",
             "--no-dashboard"], env=env, cwd=tmp_path, stdout=logs[1], stderr=logs[1]))
        from distributed import Client

        with Client(address) as c:
            c.wait_for_workers(2, timeout=120)
        store = tmp_path / "store"
        proc = subprocess.run([sys.executable, "-m", "streambars", *_args(store, market, "--yes"),
                               "--scheduler", address], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "cluster: 2 symbol task(s) on tcp://127.0.0.1:" in proc.stdout
        _assert_equal(store, reference)
        assert TEST_KEY not in proc.stdout + proc.stderr
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(60)
        for f in logs:
            f.close()
    worker_log = (tmp_path / "worker.log").read_text() + (tmp_path / "scheduler.log").read_text()
    assert TEST_KEY not in worker_log


@pytest.mark.slow
def test_ctrl_c_stops_every_task_and_a_rerun_completes_the_store(market, reference, tmp_path):
    store = tmp_path / "store"
    market.latency = 0.5
    try:
        proc = subprocess.Popen([sys.executable, "-m", "streambars", *_args(store, market, "--yes"),
                                 "--workers", "2"], env=_env(market), cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 180
        raw = store / DATASET / "raw"
        while time.monotonic() < deadline and proc.poll() is None:
            if raw.is_dir() and any(raw.rglob("*.dbn.zst")):  # a month archived: tasks mid-way
                break
            time.sleep(0.1)
        assert proc.poll() is None
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C on the terminal does: the whole group
        out, err = proc.communicate(timeout=180)
    finally:
        market.latency = 0.0
    assert proc.returncode == 130, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("streambars:")]
    assert len(lines) == 1 and lines[0].startswith("streambars: interrupted")
    assert err.strip().splitlines()[-1] == lines[0]
    assert "stop requested" in err  # the workers stopped their tasks at a batch, not killed
    assert "Traceback" not in err
    assert main(_args(store, market, "--yes")) == 0  # every file consistent: the rerun finishes
    _assert_equal(store, reference)


def test_dbn_files_of_several_symbols_on_the_cluster_equal_one_process(client, tmp_path):
    """--from-dbn: one file holding two symbols and one file of one of them later; each task
    keeps its own symbol's records."""
    from datetime import UTC, datetime

    from streambars.backfill import plan_dbn_files
    from streambars.config import load_settings
    from streambars.store import open_store
    from streambars.synthetic import es_like_1s_bars, interleave, write_dbn

    day = 86_400 * 10**9
    t0 = int(datetime(2024, 3, 4, tzinfo=UTC).timestamp()) * 10**9
    a, b = (es_like_1s_bars(t0, 2, seed=s, instrument_id=i) for s, i in ((1, 11), (2, 12)))
    later = es_like_1s_bars(t0 + 2 * day, 1, seed=3, instrument_id=11)
    files = [write_dbn(tmp_path / "both.dbn.zst", interleave(a, b), symbols={"XA": 11, "XB": 12},
                       start_ns=t0, end_ns=t0 + 2 * day),
             write_dbn(tmp_path / "xa.dbn.zst", later, symbols={"XA": 11}, start_ns=t0 + 2 * day,
                       end_ns=t0 + 3 * day)]
    tfs = "1s,1min,1h,1d"
    assert main(["backfill", "--store", str(tmp_path / "one"), "--from-dbn", *map(str, files),
                 "--timeframes", tfs, "--log-format", "json"]) == 0
    settings = load_settings(None, {"store.path": str(tmp_path / "many"), "bars.timeframes": tfs})
    plan = plan_dbn_files(settings, files, out=io.StringIO())
    assert run_on_cluster(plan, out=io.StringIO(), client=client) == 0
    with open_store(tmp_path / "one") as one, open_store(tmp_path / "many") as many:
        for symbol in ("XA", "XB"):
            for tf in tfs.split(","):
                exp = one.read(symbol, tf, dataset="GLBX.MDP3")
                assert len(exp) > 0
                np.testing.assert_array_equal(many.read(symbol, tf, dataset="GLBX.MDP3"), exp)


def test_a_worker_without_the_key_says_so(market, tmp_path, monkeypatch):
    store = tmp_path / "store"
    plan = _plan(store, market)
    store.mkdir(parents=True)
    (store / ".m").write_text("t" * 32)
    monkeypatch.delenv("DATABENTO_API_KEY")
    report = run_symbol(SymbolTask("ES.c.0", plan.for_symbols(["ES.c.0"]), "t" * 32, str(store / ".m")))
    assert not report.ok and "has no DATABENTO_API_KEY" in report.error and "worker " in report.error
    assert not list(store.rglob("*.h5"))


def test_a_damaged_dbn_file_on_the_cluster_fails_its_symbol_and_leaves_no_copy(client, tmp_path):
    """--from-dbn on a cluster: workers read the archive copy the submitter made. A cut-off
    file fails its symbol's task (named), the other file's symbol is stored, and the damaged
    input's copy is removed once every task has ended (as one process removes it: a repair
    rebuilding from the archive would read it back). The good input's copy stays."""
    from datetime import UTC, datetime

    from streambars.backfill import plan_dbn_files
    from streambars.cluster import SymbolsFailed
    from streambars.inputs import wait_archived
    from streambars.synthetic import es_like_1s_bars, write_dbn

    day = 86_400 * 10**9
    t0 = int(datetime(2024, 3, 4, tzinfo=UTC).timestamp()) * 10**9
    good = write_dbn(tmp_path / "xb.dbn.zst", es_like_1s_bars(t0, 1, seed=2, instrument_id=12),
                     symbols={"XB": 12}, start_ns=t0, end_ns=t0 + day)
    whole = write_dbn(tmp_path / "whole.dbn.zst", es_like_1s_bars(t0, 1, seed=1, instrument_id=11),
                      symbols={"XA": 11}, start_ns=t0, end_ns=t0 + day).read_bytes()
    bad = tmp_path / "xa.dbn.zst"
    bad.write_bytes(whole[: len(whole) * 2 // 3])
    settings = load_settings(None, {"store.path": str(tmp_path / "store"), "bars.timeframes": "1s,1min"})
    plan = plan_dbn_files(settings, [bad, good], out=io.StringIO())
    wait_archived()
    archive = tmp_path / "store" / "GLBX.MDP3" / "raw" / "_inputs"
    assert len(list(archive.glob("*.dbn.zst"))) == 2  # both copies made while planning
    out = io.StringIO()
    with pytest.raises(SymbolsFailed, match="1 of 2 symbol\\(s\\) failed: XA"):
        run_on_cluster(plan, out=out, client=client)
    assert "truncated" in out.getvalue() and "(input xa.dbn.zst)" in out.getvalue()
    kept = list(archive.glob("*.dbn.zst"))
    assert len(kept) == 1 and kept[0].read_bytes() == good.read_bytes()
