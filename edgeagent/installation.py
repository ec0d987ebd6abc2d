"""What `edgeagent status` adds about the installation itself: the versions running, and credential
files the installed unit names but cannot find (then it cannot start, and says so only as
`status=243/CREDENTIALS` in the journal)."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from edgeagent import __version__

if TYPE_CHECKING:
    from edgeagent.status import StatusView

UNIT = Path("/etc/systemd/system/edgeagent.service")
# edgeagent's runtime dependencies (pyproject.toml) and what they pull in that matters on a box.
DISTRIBUTIONS = ("paho-mqtt", "httpx", "httpcore", "cryptography", "cffi", "tenacity")


def versions() -> dict[str, str | None]:
    """{distribution: version} of this interpreter's environment (None when absent), plus Python's."""
    found: dict[str, str | None] = {"edgeagent": __version__, "python": sys.version.split()[0]}
    for name in DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def credential_sources(unit_text: str) -> list[str]:
    """The absolute paths of the unit's `LoadCredential=ID:PATH` lines, in order."""
    sources = []
    for line in unit_text.splitlines():
        key, _, value = line.strip().partition("=")
        if key.strip() == "LoadCredential":
            _, _, path = value.strip().partition(":")
            if path.startswith("/"):
                sources.append(path)
    return sources


def missing_credentials(unit: Path = UNIT) -> list[str]:
    """Credential files the installed unit names that do not exist (unknowable ones are left out)."""
    try:
        text = unit.read_text(encoding="utf-8")
    except OSError:
        return []
    missing = []
    for source in credential_sources(text):
        try:
            Path(source).stat()
        except FileNotFoundError:
            missing.append(source)
        except OSError:
            continue  # not allowed to look (not in the edgeagent group): the unit may well be fine
    return missing


def annotate(status: StatusView, unit: Path = UNIT) -> StatusView:
    """`status` with `versions`, and a missing credential file as the first problem (state down)."""
    status["versions"] = versions()
    missing = missing_credentials(unit)
    if missing:
        lines = [f"{path} is missing: the service cannot start until it is there" for path in missing]
        status["problems"] = lines + list(status["problems"])
        status["state"] = "down"
        status["last_error"] = lines[0]
    return status
