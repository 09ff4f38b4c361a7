"""The engine's kernel loads from numba's cache without numba's registry refresh (jitcache.py),
and every other way of loading or compiling still works: a cold cache compiles, a damaged
cache entry is rebuilt, other numba functions compile after, an unchecked numba version
takes numba's own path. Each case runs in a fresh interpreter: a refresh happens once a process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from streambars import jitcache
from streambars.engine import Aggregator
from streambars.timeframes import STANDARD_TIMEFRAMES, Session

from .reference import by_key, diff_bars, reference_bars
from .test_engine import CHICAGO, random_stream

REPO = Path(__file__).resolve().parents[1]
CHECKED = tuple(__import__("numba").version_info.short) in jitcache.CHECKED_NUMBA
COLS = ("series", "ts_event", "open", "high", "low", "close", "volume")

#: Counts numba's refreshes; ``unchecked`` makes numba look like a version the fast load was
#: not checked against (its cache files keep the real version string).
PRELUDE = """
import json, sys
import numba, numba.core.base as base
if {unchecked!r}:
    numba.version_info = numba.version_info._replace(short=(0, 0))
refreshes = []  # per refresh: how many named loads had finished then
_refresh = base.BaseContext.refresh
def counted(self):
    jc = sys.modules.get("streambars.jitcache")
    refreshes.append(len(jc.loads) if jc else -1)
    return _refresh(self)
base.BaseContext.refresh = counted
from streambars import jitcache as loading
"""

KERNEL = PRELUDE + """
import numpy as np
from streambars.engine import Aggregator
from streambars.records import RecordBatch
from streambars.timeframes import STANDARD_TIMEFRAMES, Session
engine_loads, refreshes_at_import = list(loading.loads), len(refreshes)
cols = np.load(sys.argv[1])
names = ("series", "ts_event", "open", "high", "low", "close", "volume")
agg = Aggregator(STANDARD_TIMEFRAMES, input_kind="ohlcv-1s", session=Session.parse("17:00 America/Chicago"))
half = len(cols["ts_event"]) // 2
out = [agg.process(RecordBatch("ohlcv-1s", *(cols[c][:half] for c in names))).bars]
# the rest as float64 prices: not the compiled types, so through numba's dispatcher and a conversion
out.append(agg.process(RecordBatch("ohlcv-1s", *(cols[c][half:].astype(np.float64) if c in names[2:6]
                                                  else cols[c][half:] for c in names))).bars)
out.append(agg.finish().bars)
np.save(sys.argv[2], np.concatenate(out))
# another numba function compiles (and refreshes) in the same process afterwards
fresh = numba.njit(lambda a: a.sum() * 2)
print(json.dumps({{"loads": engine_loads, "refreshes_at_import": refreshes_at_import,
                  "fresh": int(fresh(np.arange(4))), "refreshes": len(refreshes)}}))
"""

#: A one-function module with an eagerly compiled, cached signature, like the kernel's.
TINY = """
import math

import numba
from numba import types

@numba.njit(types.int64(types.int64[::1]), cache=True)
def total(a):
    s = 0
    for x in a:
        s += x * x
    return s

@numba.njit(types.float64(types.float64), cache=True, _nrt=False)
def wave(x):
    return math.sin(x) + math.exp(x)

@numba.njit(cache=True)
def other(a):
    return a.max()
"""

TINY_RUN = PRELUDE + """
import numpy as np
sys.path.insert(0, sys.argv[1])
loading.loads.clear()
del refreshes[:]
loading.load_without_refresh("tiny", "total", "wave", "other")
import tiny
print(json.dumps({{"loads": loading.loads, "refreshes": refreshes,
                  "total": int(tiny.total(np.arange(10))), "other": int(tiny.other(np.arange(7))),
                  "wave": tiny.wave(0.5)}}))
"""


def _run(script: str, *args: str, cache: Path | None = None, unchecked: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if cache is not None:
        env["NUMBA_CACHE_DIR"] = str(cache)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script.format(unchecked=unchecked)), *args],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_kernel_loads_without_refresh_and_gives_the_same_bars(tmp_path):
    """The cache is warm (this process imported the engine): a new process loads the kernel
    with no refresh at all, and its bars equal those of numba's normal load path and pandas'."""
    batch = random_stream(11, n=3000, n_series=3)
    np.savez(tmp_path / "in.npz", **{c: getattr(batch, c) for c in COLS})
    fast = _run(KERNEL, str(tmp_path / "in.npz"), str(tmp_path / "fast.npy"))
    normal = _run(KERNEL, str(tmp_path / "in.npz"), str(tmp_path / "normal.npy"), unchecked=True)
    if CHECKED:
        assert fast["loads"] == ["cache"] and fast["refreshes_at_import"] == 0
    assert normal["loads"] == ["normal"] and normal["refreshes_at_import"] > 0
    for r in (fast, normal):  # numba compiles something else afterwards, refreshing then
        assert r["fresh"] == 12 and r["refreshes"] > 0
    got, want = np.load(tmp_path / "fast.npy"), np.load(tmp_path / "normal.npy")
    assert got.tobytes() == want.tobytes()
    ref = reference_bars(*(getattr(batch, c) for c in COLS), Aggregator(STANDARD_TIMEFRAMES, input_kind="ohlcv-1s", session=CHICAGO).timeframes, CHICAGO)
    assert not diff_bars(got, ref)
    # and this process's kernel (loaded however the suite's first import did) agrees
    agg = Aggregator(STANDARD_TIMEFRAMES, input_kind="ohlcv-1s", session=Session.parse("17:00 America/Chicago"))
    mine = np.concatenate([agg.process(batch).bars, agg.finish().bars])
    assert by_key(mine).tobytes() == by_key(got).tobytes()  # other splits: per (series, timeframe)


@pytest.mark.skipif(not CHECKED, reason="numba version not checked: loads take numba's own path")
def test_cold_warm_damaged_and_unchecked_cache(tmp_path):
    """A cold cache compiles (the compiler refreshes). A warm one loads ``total`` (numba's
    runtime, no refresh) and ``other`` at its first call, and refreshes only for ``wave``,
    whose object code calls libm (not a symbol known to be there without it). A damaged
    entry (data or index) is compiled afresh and rewritten, loaded again the next time; an
    unchecked numba version takes numba's own path. Every result is right."""
    (tmp_path / "mod").mkdir()
    (tmp_path / "mod" / "tiny.py").write_text(TINY)
    cache = tmp_path / "cache"
    expect = {"total": sum(x * x for x in range(10)), "other": 6, "wave": math.sin(0.5) + math.exp(0.5)}

    def run(**kw) -> dict:
        r = _run(TINY_RUN, str(tmp_path / "mod"), cache=cache, **kw)
        assert {k: r[k] for k in expect} == pytest.approx(expect, rel=1e-15)
        return r

    assert run()["loads"] == ["miss", "miss", "miss"]
    warm = run()
    assert warm["loads"] == ["cache", "refreshed", "cache"] and min(warm["refreshes"]) == 1
    for suffix in (".nbc", ".nbi"):  # cut short: numba itself would raise reading either
        entries = list(cache.rglob(f"tiny.total-*{suffix}"))
        assert len(entries) == 1, entries
        entries[0].write_bytes(entries[0].read_bytes()[: entries[0].stat().st_size // 2])
        assert run()["loads"] == ["fallback", "refreshed", "cache"]
        assert run()["loads"] == ["cache", "refreshed", "cache"]  # rebuilt
    assert run(unchecked=True)["loads"] == ["normal"]


DECODE = PRELUDE + """
from streambars.records import SeriesRegistry
from streambars.sources import dbnfile
import streambars.engine  # as in a backfill: the kernel is loaded first
loading.loads.clear()
del refreshes[:]
batches = list(dbnfile.iter_batches(sys.argv[1], SeriesRegistry()))
print(json.dumps({{"loads": loading.loads, "refreshes": len(refreshes),
                  "volume": int(sum(int(b.volume.sum()) for b in batches))}}))
"""


@pytest.mark.skipif(not CHECKED, reason="numba version not checked: loads take numba's own path")
def test_decoding_a_dbn_file_loads_its_column_copy_without_refresh(tmp_path):
    """A backfill's first batch waited ~0.2 s for numba's refresh before the column copy of
    the decode stage (sources/columns.py) was named to jitcache: it now loads from the cache
    like the kernel, and its columns are the file's."""
    from streambars.records import SeriesRegistry
    from streambars.sources import dbnfile
    from streambars.synthetic import es_like_1s_bars, write_dbn

    recs = es_like_1s_bars(1_704_067_200 * 10**9, 0.2, seed=5, instrument_id=7)
    path = write_dbn(tmp_path / "in.dbn.zst", recs, dataset="GLBX.MDP3", symbols={"ESH4": 7})
    list(dbnfile.iter_batches(path, SeriesRegistry()))  # warms the cache in this process
    got = _run(DECODE, str(path))
    assert got["loads"] == ["cache"] and got["refreshes"] == 0
    assert got["volume"] == int(recs["volume"].astype(np.int64).sum())
