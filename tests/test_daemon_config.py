"""The shipped example config and systemd unit: complete, loadable, and what the daemon needs."""

from __future__ import annotations

import configparser
import dataclasses
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from streambars.config import _SECTIONS, load_settings

CONFIG = Path(__file__).resolve().parents[1] / "config"


def test_example_config_loads_and_covers_every_key():
    path = CONFIG / "streambars.toml"
    settings = load_settings(path)
    assert settings.databento.symbols == ("ES.c.0", "NQ.c.0")
    raw = tomllib.loads(path.read_text())
    assert set(raw) == set(_SECTIONS)
    for section, cls in _SECTIONS.items():
        missing = {f.name for f in dataclasses.fields(cls)} - set(raw[section])
        assert not missing, f"config/streambars.toml lacks [{section}] {sorted(missing)}"


UNITS = ["streambars.service", "streambars@.service"]  # one daemon; one per shard (docs/cluster.md)


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # keys are case-sensitive
    parser.read(CONFIG / name)
    return parser


@pytest.mark.parametrize("name", UNITS)
def test_service_unit_has_what_the_daemon_relies_on(name):
    svc = _unit(name)["Service"]
    assert svc["Type"] == "notify"
    assert int(svc["WatchdogSec"]) > 0
    assert svc["Restart"] == "on-failure"
    assert svc["EnvironmentFile"].lstrip("-").startswith("/")  # "-": optional (a shard's own key)
    # Environment= appears twice (configparser keeps the last): check the text.
    assert "Environment=NUMBA_CACHE_DIR=%C/streambars/" in (CONFIG / name).read_text()
    assert svc["CacheDirectory"] and svc["StateDirectory"]
    assert svc["ProtectSystem"] == "strict" and svc["NoNewPrivileges"] == "yes"
    assert svc["ReadWritePaths"]
    assert int(svc["TimeoutStopSec"]) >= 10
    assert "2" in svc["RestartPreventExitStatus"].split()  # bad config / refused key: no retry
    assert svc["MemoryDenyWriteExecute"] == "no"  # numba JIT needs W+X pages
    if "@" in name:  # each instance its own config (and its own state directory for a store)
        assert "--config /etc/streambars/%i.toml" in svc["ExecStart"]
        assert "streambars/%i" in svc["StateDirectory"].split()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("name", UNITS)
def test_service_unit_passes_systemd_analyze(tmp_path, name):
    unit = tmp_path / name.replace("@.", "@shard-a.")  # a template is verified as an instance
    unit.write_text((CONFIG / name).read_text())
    res = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )
    # The ExecStart binary does not exist on a build machine; anything else is a real error.
    problems = [
        line for line in (res.stdout + res.stderr).splitlines()
        if line.strip() and "is not executable" not in line and "No such file" not in line
    ]
    assert not problems, problems
