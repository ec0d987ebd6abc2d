"""edgeagent.installation (versions and missing credentials in `edgeagent status`), the unit's guard
against a missing credential, and deploy/requirements.lock against pyproject.toml."""

from __future__ import annotations

from pathlib import Path

from edgeagent import __version__, installation
from tests.system import lockfile

REPO = Path(__file__).resolve().parents[2]
UNIT = (REPO / "systemd" / "edgeagent.service").read_text()


def test_credential_sources_are_the_absolute_paths_of_load_credential() -> None:
    text = "[Service]\nLoadCredential=a.pem:/etc/x/a.pem\n LoadCredential = b:/etc/x/b\nLoadCredential=c:rel\n"
    assert installation.credential_sources(text) == ["/etc/x/a.pem", "/etc/x/b"]


def test_every_credential_of_the_unit_is_a_start_condition() -> None:
    # Without it, a missing file makes systemd restart the unit every RestartSec forever, logging only
    # "Failed to set up credentials: Protocol error" (found on a real systemd 252, tests/system).
    sources = installation.credential_sources(UNIT)
    assert sources
    for source in sources:
        assert f"ConditionPathExists={source}\n" in UNIT, f"add ConditionPathExists={source} to [Unit]"
    assert "243" in next(line for line in UNIT.splitlines() if line.startswith("RestartPreventExitStatus="))


def test_status_names_a_missing_credential_file_and_reports_versions(tmp_path: Path) -> None:
    present = tmp_path / "present.pem"
    present.write_text("x")
    unit = tmp_path / "edgeagent.service"
    unit.write_text(f"LoadCredential=a:{present}\nLoadCredential=b:{tmp_path}/absent.pem\n")
    status = installation.annotate({"state": "ok", "problems": ["later"], "last_error": None}, unit)  # type: ignore[typeddict-item]
    assert status["state"] == "down"
    assert status["problems"] == [
        f"{tmp_path}/absent.pem is missing: the service cannot start until it is there",
        "later",
    ]
    assert status["versions"]["edgeagent"] == __version__
    assert status["versions"]["httpx"] and status["versions"]["cryptography"]
    bare = {"state": "ok", "problems": []}
    assert installation.annotate(bare, tmp_path / "no-unit")["state"] == "ok"  # type: ignore[arg-type]


def test_the_lock_pins_every_dependency_of_pyproject_with_hashes() -> None:
    assert lockfile.problems(lockfile.LOCK.read_text()) == []
    pins = lockfile.parse(lockfile.LOCK.read_text())
    assert {"paho-mqtt", "httpx", "cryptography", "tenacity", "setuptools"} <= set(pins)
    # cryptography and cffi: one wheel per architecture (cffi's armhf entry is its sdist).
    assert len(pins["cryptography"][1]) >= 3 and len(pins["cffi"][1]) >= 3
