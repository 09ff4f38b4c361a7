"""Damaged store files: what each command says and how soon, per class of damage.

    python bench/store_faults.py [--fork]

Runs every scenario of tests/test_store_faults.py (truncations, flipped row bytes, flipped
superblock, object header and index-block bytes) with all of its checks, and prints per class
the exit codes of ``inspect`` and ``validate``, the time from starting the command to its
first line of output (a real ``python -m streambars`` process: interpreter start and imports
included, ~1-2 s of it; ``--fork`` runs a forked copy instead, which leaves them out) and how
long the reader took to raise (open_store to the first StoreError, inside its process). The machine is shared: read the figures
as orders of size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_store_faults import build_store, check_scenario, scenarios  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fork", action="store_true", help="forked CLI runs (no interpreter start)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sb-faults-") as tmp:
        template = Path(tmp) / "template"
        build_store(template)
        if args.fork:  # warm the parent the forks copy, as the test fixture does
            from streambars.cli import main as cli_main

            cli_main(["validate", "--store", str(template), "--report", str(Path(tmp) / "warm.txt")])
        from tests.test_store_faults import run_cli

        base = {cmd: run_cli(cmd, "--store", str(template), *(["--report", str(Path(tmp) / "b.txt")]
                             if cmd == "validate" else []), fork=args.fork).first_line_s
                for cmd in ("inspect", "validate")}  # fmt: skip
        results = []
        t0 = time.monotonic()
        for i, sc in enumerate(scenarios(template)):
            results.append(check_scenario(template, Path(tmp) / str(i), sc, fork=args.fork))
        took = time.monotonic() - t0
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by_kind[r["kind"]].append(r)
    print(f"{len(results)} scenarios, all checks passed ({took:.0f} s)")
    print(f"{'class':<12} {'n':>3}  {'inspect':>7} {'validate':>8}  "
          f"{'inspect 1st line s':>20}  {'validate 1st line s':>20}  {'reader raises s':>16}")  # fmt: skip
    for kind, rs in by_kind.items():
        def span(key: str, rs: list[dict] = rs) -> str:
            xs = [r[key] for r in rs]
            return f"{min(xs):.2f}/{statistics.median(xs):.2f}/{max(xs):.2f}"

        codes = {k: ",".join(sorted({str(r[f"{k}_code"]) for r in rs})) for k in ("inspect", "validate")}
        print(f"{kind:<12} {len(rs):>3}  {codes['inspect']:>7} {codes['validate']:>8}  "
              f"{span('inspect_first_line_s'):>20}  {span('validate_first_line_s'):>20}  "
              f"{span('reader_s'):>16}")  # fmt: skip
    print(f"{'healthy':<12} {'':>3}  {'0':>7} {'0/1':>8}  {base['inspect']:>20.2f}  {base['validate']:>20.2f}")
    print("(min/median/max s; reader: open_store + first failing call, in-process; rows-middle: a "
          "flipped row mid-file, seen by reads and validate only)")


if __name__ == "__main__":
    main()
