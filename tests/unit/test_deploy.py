"""Deployment files only use variables the settings class knows."""

import re
from pathlib import Path

from config.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]


def test_systemd_environment_file_names_only_known_variables() -> None:
    text = (ROOT / "deploy/systemd/rabbit-archive.env").read_text()
    names = re.findall(rf"^{ENV_PREFIX}([A-Z_]+)=", text, flags=re.MULTILINE)
    assert names
    known = {name.upper() for name in Settings.model_fields}
    assert set(names) <= known


def test_systemd_unit_reads_that_file_and_runs_the_daemon() -> None:
    unit = (ROOT / "deploy/systemd/rabbit-capture.service").read_text()
    assert "EnvironmentFile=/etc/rabbit-archive/rabbit-archive.env" in unit
    assert re.search(r"^ExecStart=\S+/rabbit-capture run$", unit, flags=re.MULTILINE)
