"""The command line: every subcommand describes itself, bad configuration exits 2 before any
work, logs are JSON lines off a terminal, and the demo runs end to end from a clean folder."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from streambars.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("demo", "check", "backfill", "run", "inspect", "export", "validate", "compact", "repair", "plot")


def _run(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streambars", *args], cwd=cwd, capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=300,
    )


def test_help_lists_every_subcommand():
    text = build_parser().format_help()
    for name in SUBCOMMANDS:
        assert name in text


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_describes_itself(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"streambars {name}" in out and "--config" in out and len(out) > 400


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_python_dash_m_and_version():
    p = _run("--version")
    assert p.returncode == 0 and p.stdout.strip() == "0.1.0"


def test_bad_config_exits_2_naming_key_before_work(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[bars]\ntimeframes = ["1s", "7x"]\n')
    p = _run("backfill", "--config", str(cfg), "--store", str(tmp_path / "store"),
             "--start", "2024-01", "--end", "2024-02", "--symbols", "ES.c.0")
    assert p.returncode == 2
    assert "bars.timeframes" in p.stderr and "7x" in p.stderr
    assert not (tmp_path / "store").exists()


def test_demo_runs_from_a_clean_folder_and_logs_json(tmp_path):
    p = _run("demo", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ESM4" in p.stdout and "1min" in p.stdout and "validation: no rule broken" in p.stdout
    assert (tmp_path / "store" / "GLBX.MDP3" / "ESM4.h5").is_file()
    # The demo's own summary is not interleaved with info logs ...
    assert p.stderr.strip() == "", p.stderr[-3000:]
    # ... which --log-level info brings back; stderr is not a terminal: each is one JSON object.
    shutil.rmtree(tmp_path / "store")
    p = _run("demo", "--log-level", "info", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines
    for ln in lines:
        event = json.loads(ln)
        assert "event" in event and "level" in event and "timestamp" in event
    # A second demo run is idempotent: same rows, nothing new written.
    p2 = _run("demo", cwd=tmp_path)
    assert p2.returncode == 0
    assert "0 bars written" in p2.stdout


def _fake_args(**kw) -> argparse.Namespace:
    return argparse.Namespace(config=None, overrides=[], log_format="json", **kw)


def _boom(args, settings):
    raise RuntimeError("kaboom with db-" + "Secret0123456789abcdefghijkl")


def test_an_unexpected_error_is_one_line_and_exit_1(capsys):
    from streambars.cli import run_handler

    assert run_handler(_boom, _fake_args(log_level="info")) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("streambars:")]
    assert len(lines) == 1 and "RuntimeError: kaboom" in lines[0] and "--log-level debug" in lines[0]
    assert "Secret0123" not in err


def test_the_traceback_only_with_log_level_debug(capsys):
    from streambars.cli import run_handler

    assert run_handler(_boom, _fake_args(log_level="debug")) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "_boom" in err and "RuntimeError: kaboom with <redacted>" in err
    assert err.rstrip().splitlines()[-1].startswith("streambars: internal error RuntimeError")


def test_exception_groups_report_their_most_telling_member(capsys):
    from streambars.cli import run_handler
    from streambars.errors import Interrupted, StoreError, UsageError

    def group(*errors):
        def handler(args, settings):
            raise BaseExceptionGroup("tasks", list(errors))
        return handler

    assert run_handler(group(RuntimeError("secondary"), UsageError("bad --start")), _fake_args()) == 2
    assert capsys.readouterr().err.strip().endswith("streambars: bad --start")
    assert run_handler(group(StoreError("disk"), Interrupted("SIGTERM")), _fake_args()) == 130
    assert "interrupted (SIGTERM)" in capsys.readouterr().err
    assert run_handler(group(OSError(28, "No space left on device", "/x/y.h5")), _fake_args()) == 1
    assert "No space left on device (errno 28): /x/y.h5" in capsys.readouterr().err
