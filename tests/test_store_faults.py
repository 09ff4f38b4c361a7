"""Fault injection: damaged store files are named, isolated and left untouched; a symbol is
never missing while its file is being created, opened, or after its writer was killed.

Each damage scenario copies one small store (the victim file and a healthy GOOD file),
damages the victim -- truncated to several sizes, bytes flipped in row data, in object
headers and in the other checksummed metadata blocks -- and then runs, each in its own
process with a generous timeout (a hang fails the test instead of stalling it):

* a reader and a writer (tests/store_worker.py faults): the reader raises a StoreError naming
  the file, still lists the symbol, and reads GOOD; the writer refuses, saying the file was
  left untouched;
* ``streambars inspect`` and ``validate``: a row saying "damaged: ...", GOOD's rows, exit 2,
  no traceback;

and checks that the victim is byte-for-byte what the damage left. Speed is not asserted:
bench/store_faults.py prints the exit codes and the time to the first line per class.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import pytest

from streambars.records import BAR_DTYPE
from streambars.store import BarFileWriter, file_path, open_store
from streambars.timeframes import UTC_MIDNIGHT

from .store_worker import DATASET, STYPE, SYMBOL, TIMEFRAMES, batch, open_writer

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("store_worker.py")
TIMEOUT = 20  # s: far above the ~1 s a damaged file may take; only a hang gets near it
VICTIM_ROWS, GOOD_ROWS = 5000, 2000
TS_OFFSET = BAR_DTYPE.fields["ts_event"][1]
#: Checksummed metadata blocks a reader or writer loads: object headers and their
#: continuations, chunk indexes (extensible arrays, v2 B-trees), fractal heaps.
META_SIGNATURES = (b"OHDR", b"OCHK", b"EAHD", b"EAIB", b"EADB", b"BTHD", b"BTLF", b"FRHP", b"FHDB")


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # truncated | rows | rows-middle | metadata
    damage: Callable[[Path], None]


def build_store(root: Path) -> None:
    """The victim (SYMBOL, 5000 1s rows + 84 1min rows) and GOOD (2000 + 34), closed cleanly."""
    w = open_writer(str(root))
    w.append(batch(0, VICTIM_ROWS))
    w.close()
    w = BarFileWriter(root, DATASET, "GOOD", stype=STYPE, timeframes=TIMEFRAMES, session=UTC_MIDNIGHT,
                      chunk_rows=256)  # fmt: skip
    w.append(batch(0, GOOD_ROWS))
    w.close()


def truncate_to(size: Callable[[int], int]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        os.truncate(path, size(os.path.getsize(path)))

    return damage


def flip(offset: int, n: int = 4) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        with open(path, "r+b") as fh:
            fh.seek(offset)
            data = fh.read(n)
            fh.seek(offset)
            fh.write(bytes(b ^ 0xFF for b in data))

    return damage


def row_offset(path: Path, tf: str, row: int) -> int:
    """File offset of the high half of row ``row``'s ts_event (flipping it makes the time
    impossible, as scrambled bytes do)."""
    with h5py.File(path, "r") as f:
        ds = f[f"bars/{tf}"]
        chunk = ds.chunks[0]
        info = ds.id.get_chunk_info_by_coord((row // chunk * chunk,))
        return info.byte_offset + (row % chunk) * BAR_DTYPE.itemsize + TS_OFFSET + 4


def scenarios(template: Path) -> list[Scenario]:
    """Every damage applied to the victim of a store built by :func:`build_store`."""
    victim = file_path(template, DATASET, SYMBOL)
    out = [
        Scenario("truncated-99%", "truncated", truncate_to(lambda n: n * 99 // 100)),
        Scenario("truncated-50%", "truncated", truncate_to(lambda n: n // 2)),
        Scenario("truncated-1%", "truncated", truncate_to(lambda n: n // 100)),
        Scenario("truncated-5-bytes", "truncated", truncate_to(lambda n: 5)),
        Scenario("truncated-0-bytes", "truncated", truncate_to(lambda n: 0)),
        Scenario("rows-1s-first", "rows", flip(row_offset(victim, "1s", 0))),
        Scenario("rows-1s-last", "rows", flip(row_offset(victim, "1s", VICTIM_ROWS - 1))),
        Scenario("rows-1min-last", "rows", flip(row_offset(victim, "1min", VICTIM_ROWS // 60))),
        Scenario("rows-1s-middle", "rows-middle", flip(row_offset(victim, "1s", VICTIM_ROWS // 2 + 7))),
        Scenario("superblock", "metadata", flip(20, 2)),
    ]
    data = victim.read_bytes()
    for sig in META_SIGNATURES:
        hits = [m.start() for m in re.finditer(re.escape(sig), data)]
        for k, at in enumerate(hits if sig == b"OHDR" else hits[:1]):
            out.append(Scenario(f"{sig.decode()}-{k}@{at}", "metadata", flip(at + 6, 2)))
    return out


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults-template")
    build_store(root)
    # Import what `inspect` and `validate` load (calendars, rules) once here, so each forked
    # run starts with it as a long-running interpreter would.
    from streambars.cli import main

    assert main(["validate", "--store", str(root), "--report", str(root.parent / "warm.txt")]) in (0, 1)
    assert main(["inspect", "--store", str(root)]) == 0
    return root


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1"}


@dataclass
class CliRun:
    code: int
    out: str
    err: str
    first_line_s: float


def run_cli(*args: str, fork: bool = False) -> CliRun:
    """``python -m streambars ARGS`` in a new process; also the time from its start to its
    first line of output. ``fork``: a forked copy of this process runs ``cli.main`` (the
    same code, without ~2 s of interpreter start and imports per run)."""
    t0 = time.monotonic()
    if fork:
        return _collect(_forked(_cli_main, list(args)), t0, f"streambars {' '.join(args)}")
    proc = subprocess.Popen([sys.executable, "-m", "streambars", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO)  # fmt: skip
    return _collect(proc, t0, f"streambars {' '.join(args)}")


def _collect(proc: subprocess.Popen | _Forked, t0: float, what: str) -> CliRun:
    timer = threading.Timer(TIMEOUT, proc.kill)  # a hang fails the test, not the run
    timer.start()
    try:
        first = proc.stdout.readline()
        first_s = time.monotonic() - t0
        out, err = proc.stdout.read(), proc.stderr.read()
        code = proc.wait()
    finally:
        timer.cancel()
    if code == -signal.SIGKILL:
        pytest.fail(f"{what} hung (killed after {TIMEOUT} s)")
    return CliRun(code, first + out, err, first_s)


class _Forked:
    """The parts of Popen run_cli uses, for a forked child running cli.main."""

    def __init__(self, pid: int, out: int, err: int):
        self.pid = pid
        self.stdout, self.stderr = os.fdopen(out), os.fdopen(err)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        status = os.waitpid(self.pid, 0)[1]
        self.stdout.close()
        self.stderr.close()
        return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _cli_main(argv: list[str]) -> int:
    from streambars.cli import main

    return main(argv)


def _worker_main(argv: list[str]) -> int:
    from . import store_worker

    getattr(store_worker, f"cmd_{argv[0]}")(*argv[1:])
    return 0


def _forked(target: Callable[[list[str]], int], argv: list[str]) -> _Forked:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: stdout/stderr to the pipes, run the CLI, exit with its code
        code = 99
        try:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            code = target(argv)
        except BaseException:  # noqa: BLE001 - shown as the traceback the test looks for
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    return _Forked(pid, out_r, err_r)


def run_worker(*args: str, fork: bool = False) -> dict:
    """tests/store_worker.py ARGS in a new process (forked: see run_cli); its last event."""
    if fork:
        r = _collect(_forked(_worker_main, list(args)), time.monotonic(), f"store_worker {' '.join(args)}")
        assert r.code == 0, r.err
        return json.loads(r.out.splitlines()[-1])
    try:
        done = subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True,
                              timeout=TIMEOUT, env=env())  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"store_worker {' '.join(args)} hung (killed after {TIMEOUT} s)")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def damaged_store(template: Path, tmp_path: Path, scenario: Scenario) -> tuple[Path, Path]:
    root = tmp_path / "store"
    shutil.copytree(template, root)
    victim = file_path(root, DATASET, SYMBOL)
    scenario.damage(victim)
    return root, victim


def check_scenario(template: Path, tmp_path: Path, scenario: Scenario, fork: bool = True) -> dict:
    """Run every check of one scenario; returns the measurements (for bench/store_faults.py)."""
    root, victim = damaged_store(template, tmp_path, scenario)
    before = sha(victim)
    middle = scenario.kind == "rows-middle"  # only a full read sees it (not inspect, not open)

    got = run_worker("faults", str(root), fork=fork)
    assert SYMBOL in got["symbols"] and "GOOD" in got["symbols"], got
    assert got["good_rows"] == GOOD_ROWS
    assert got["read_1s"].startswith("DamagedFileError") and str(victim) in got["read_1s"], got
    if not middle:
        for op in ("series", "read_1min", "read_df", "open_file"):
            assert got[op].startswith("DamagedFileError") and str(victim) in got[op], (op, got)
        assert got["writer"].startswith("DamagedFileError") and "left untouched" in got["writer"], got

    runs = {}
    for cmd in ("inspect", "validate"):
        extra = ["--report", str(tmp_path / "v.txt")] if cmd == "validate" else []
        r = runs[cmd] = run_cli(cmd, "--store", str(root), *extra, fork=fork)
        assert "Traceback" not in r.err, r.err
        lines = r.out.splitlines()
        victim_rows = [ln for ln in lines if SYMBOL in ln and "damaged:" in ln]
        good_rows = [ln for ln in lines if re.match(rf"{DATASET}\s+GOOD\s", ln)]
        assert len(good_rows) == 2, r.out  # 1s and 1min: the rest of the store is there
        if middle and cmd == "inspect":
            continue  # inspect checks structure and first/last rows, not every row
        assert r.code == 2, (cmd, r.code, r.out, r.err)
        assert len(victim_rows) == 1, (cmd, r.out)
        if cmd == "inspect":
            assert r.err.count("\n") == 1 and r.err.startswith("streambars: "), r.err

    assert sha(victim) == before, "the damaged file was modified"
    return {
        "scenario": scenario.name, "kind": scenario.kind,
        "reader_s": got["first_error_s"], "writer_s": got["writer_s"],
        "inspect_code": runs["inspect"].code, "inspect_first_line_s": runs["inspect"].first_line_s,
        "validate_code": runs["validate"].code, "validate_first_line_s": runs["validate"].first_line_s,
    }  # fmt: skip


def _ids() -> list[str]:
    return [
        "truncated-99%", "truncated-50%", "truncated-1%", "truncated-5-bytes", "truncated-0-bytes",
        "rows-1s-first", "rows-1s-last", "rows-1min-last", "rows-1s-middle", "superblock",
    ]  # fmt: skip


@pytest.mark.parametrize("name", _ids())
def test_damaged_file_is_named_isolated_and_left_untouched(template, tmp_path, name):
    scenario = next(s for s in scenarios(template) if s.name == name)
    # Truncations run the real `python -m streambars`; the rest a forked copy of this process.
    check_scenario(template, tmp_path, scenario, fork=scenario.kind != "truncated")


def test_flipped_bytes_in_every_object_header_and_index_block(template, tmp_path):
    found = [s for s in scenarios(template) if s.kind == "metadata" and s.name != "superblock"]
    kinds = {s.name.split("-")[0] for s in found}
    assert sum(s.name.startswith("OHDR") for s in found) >= 10  # root, groups, every dataset
    assert {"OHDR", "EAHD"} <= kinds, kinds
    for i, scenario in enumerate(found):
        check_scenario(template, tmp_path / str(i), scenario)


def test_writer_still_repairs_the_crash_shapes(template, tmp_path):
    """Refusing damage must not refuse what a crash leaves: marks set and a stale EOA
    (kill -9 mid-append), never-written rows at the end."""
    root = tmp_path / "store"
    shutil.copytree(template, root)
    path = file_path(root, DATASET, SYMBOL)
    with h5py.File(path, "r+") as f:  # rows allocated, never written (HDF5 fill: zeros)
        f["bars/1s"].resize((VICTIM_ROWS + 3,))
    with open_store(root) as r:  # a reader hides them ...
        assert r.read(SYMBOL, "1s").shape[0] == VICTIM_ROWS
    with open_writer(str(root)) as w:  # ... and a writer trims them
        assert w.rows("1s") == VICTIM_ROWS


def test_compact_refuses_a_damaged_file_and_paths_outside_the_store(template, tmp_path):
    root, victim = damaged_store(template, tmp_path, scenarios(template)[1])
    before = sha(victim)
    r = run_cli("compact", "--store", str(root), str(victim))
    assert r.code == 2 and "damaged" in r.err and "left untouched" in r.err and "Traceback" not in r.err
    assert sha(victim) == before
    outside = tmp_path / "hostname"
    outside.write_text("box\n")
    for arg in (str(outside), "/etc/hostname", str(root / "notes.txt")):
        r = run_cli("compact", "--store", str(root), arg)
        assert r.code == 2 and "is not a store file" in r.err and r.err.count("\n") == 1, r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostname", "store"]  # no .hostname.lock
    assert not Path("/etc/.hostname.lock").exists()


def test_temp_files_of_dead_processes_are_removed(template, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(template, root)
    path = file_path(root, DATASET, SYMBOL)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # fmt: skip
    stale = [path.with_name(f".{path.name}.compact-{dead}"), path.with_name(f".{path.name}.creating-{dead}")]
    alive = path.with_name(f".{path.name}.compact-1")  # pid 1 lives: not ours to remove
    for p in [*stale, alive]:
        p.write_bytes(b"partial")
    assert run_cli("compact", "--store", str(root), str(path)).code == 0
    assert not any(p.exists() for p in stale) and alive.exists()
    stale[0].write_bytes(b"partial")
    open_writer(str(root)).close()
    assert not stale[0].exists()


# -- a symbol is never missing --------------------------------------------------------------


def test_symbol_is_listed_while_writers_are_killed_at_random_points(tmp_path):
    """Poll symbols() in a loop while writers creating (and reopening) the file are SIGKILLed
    at random moments: once the file exists, the symbol is always listed, and a read either
    gives rows or says why not -- never 'no symbol'."""
    rng = random.Random(7)
    polls = misses = kills = 0
    reads: dict[str, int] = {}
    for k in range(20):
        root = tmp_path / f"s{k % 10}"  # 10 stores: creation, then a reopen of each
        root.mkdir(exist_ok=True)
        path = file_path(root, DATASET, SYMBOL)
        reader = open_store(root)
        proc = subprocess.Popen([sys.executable, str(WORKER), "open", str(root)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=env())  # fmt: skip
        assert json.loads(proc.stdout.readline())["event"] == "starting"
        # Creating or reopening, appending and closing take ~50-150 ms: kill anywhere in it.
        deadline = time.monotonic() + rng.uniform(0, 0.15)
        while time.monotonic() < deadline and proc.poll() is None:
            existed = path.exists()
            symbols = reader.symbols()
            polls += 1
            if existed and SYMBOL not in symbols:
                misses += 1
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        for _ in range(20):  # and after the kill, as before
            existed = path.exists()
            symbols = reader.symbols()
            polls += 1
            if existed and SYMBOL not in symbols:
                misses += 1
        if path.exists():
            assert SYMBOL in reader.symbols()
            try:
                reader.read(SYMBOL, "1s")
                outcome = "rows"
            except Exception as e:  # noqa: BLE001 - classified below
                outcome = type(e).__name__
                assert "no symbol" not in str(e) and str(path) in str(e), e
            reads[outcome] = reads.get(outcome, 0) + 1
        reader.close()
    assert misses == 0, f"{misses} of {polls} polls missed the symbol"
    assert kills >= 10
    for k in range(10):  # every file a killed writer left is repaired by the next writer
        root = tmp_path / f"s{k}"
        run_worker("open", str(root))
        with open_store(root) as r:
            assert r.read(SYMBOL, "1s").shape[0] >= 100
    print(f"{polls} polls, {kills} kills, reads after a kill: {reads}")


def test_commands_naming_a_damaged_symbol_say_damaged_not_missing(template, tmp_path):
    root, victim = damaged_store(template, tmp_path, scenarios(template)[1])  # truncated 50%
    r = run_cli("validate", "--store", str(root), "--symbol", SYMBOL, "--report", str(tmp_path / "v.txt"),
                fork=True)  # fmt: skip
    assert r.code == 2 and "not in the store" not in r.err + r.out
    assert any(SYMBOL in ln and "damaged: truncated" in ln for ln in r.out.splitlines()), r.out
    r = run_cli("export", "--store", str(root), "--symbol", SYMBOL, "--timeframe", "1s",
                "--out", str(tmp_path / "x.csv"), fork=True)  # fmt: skip
    assert r.code == 2 and r.err.startswith(f"streambars: {victim} is damaged: truncated") and r.err.count("\n") == 1
    assert not (tmp_path / "x.csv").exists()
    r = run_cli("export", "--store", str(root), "--symbol", "GOOD", "--timeframe", "1s",
                "--out", str(tmp_path / "g.csv"), fork=True)  # fmt: skip
    assert r.code == 0 and (tmp_path / "g.csv").exists()  # the rest of the store reads normally
