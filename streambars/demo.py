"""`streambars demo`: the whole backfill pipeline on data that ships in the package.

No API key and no network: a seeded, several-day ES-like 1-second-bar DBN file
(``data/sample-es-1s.dbn.zst``, made by :func:`write_sample` from :mod:`streambars.synthetic`;
five days from 2024-03-07, across the 2024-03-10 DST change) and a few real
Databento records (``data/GLBX.MDP3-ESH1.ohlcv-1s.dbn.zst``, Apache-2.0, from Databento's
own test data) go through the same code path as ``backfill --from-dbn`` into the store;
then the inspect table and the last 1min bars are printed.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import TextIO

from .backfill import ingest_dbn_files, print_summary
from .config import Settings

SAMPLE_FILES = ("sample-es-1s.dbn.zst", "GLBX.MDP3-ESH1.ohlcv-1s.dbn.zst")


SAMPLE_SYMBOL = "ESM4"
SAMPLE_START = "2024-03-07"


def write_sample(path: Path | None = None) -> Path:
    """Regenerate the bundled synthetic sample (deterministic: same seed, same bytes)."""
    from datetime import UTC, datetime

    from .synthetic import es_like_1s_bars, write_dbn

    start = int(datetime.fromisoformat(SAMPLE_START).replace(tzinfo=UTC).timestamp()) * 10**9
    records = es_like_1s_bars(start, 5, seed=20240307, instrument_id=5602)
    path = path or sample_paths()[0]
    return write_dbn(
        path, records, dataset="GLBX.MDP3", symbols={SAMPLE_SYMBOL: 5602},
        start_ns=start, end_ns=start + 5 * 86_400 * 10**9,
    )


def sample_paths() -> list[Path]:
    """The bundled DBN files, as real paths (the package may be installed as a wheel)."""
    base = resources.files("streambars") / "data"
    return [Path(str(base / name)) for name in SAMPLE_FILES]


def run_demo(settings: Settings, out: TextIO = sys.stdout) -> int:
    from .store import inspect_store, open_store
    from .tables import format_table

    paths = sample_paths()
    print(f"demo: ingesting the bundled sample into {settings.store.path.resolve()}", file=out)
    result = ingest_dbn_files(settings, paths, out=out)
    print_summary(result, out)
    print("", file=out)
    print(format_table(inspect_store(settings.store.path)), file=out)
    reader = open_store(settings.store.path)
    symbol = SAMPLE_SYMBOL
    df = reader.read_df(symbol, "1min", dataset="GLBX.MDP3")
    print(f"\nlast 1min bars of {symbol} (prices in index points):", file=out)
    print(df.tail(5).to_string(), file=out)
    print(
        "\nread them yourself:  python -c \"import streambars; "
        f"print(streambars.open_store('{settings.store.path}').read_df('{symbol}', '1min').tail())\"",
        file=out,
    )
    return 0
