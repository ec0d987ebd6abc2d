"""The system tier: every test here is marked `system` and runs only when asked (`make system`, or
`pytest -m system tests/system`); plain `pytest` deselects them (pyproject addopts: -m "not system")."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests.system import box as boxlib

T = TypeVar("T")
IN_BOX_CHECKOUT = "/srv/edgeagent-checkout"
IN_BOX_WHEELS = "/var/cache/edgeagent-wheels"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.system)


def wait_for(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll `check` until it returns something truthy; AssertionError naming `what` and the last value."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except AssertionError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"after {timeout:.0f} s still waiting for {what}; last: {last!r}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def box() -> Iterator[boxlib.Box]:
    """A fresh bookworm with a real systemd as PID 1; the checkout and the locked wheels mounted in."""
    reason = boxlib.why_not("amd64")
    if reason:
        pytest.skip(reason)
    # A CI timeout or a kill sends SIGTERM: stop like Ctrl-C, so the box is powered off and unmounted.
    signal.signal(signal.SIGTERM, _interrupt)
    boxlib.ensure_host_tools("amd64")
    rootfs = boxlib.rootfs("amd64")
    wheels = boxlib.wheelhouse("amd64")
    with boxlib.booted(rootfs, {boxlib.REPO: IN_BOX_CHECKOUT, wheels: IN_BOX_WHEELS}) as booted:
        yield booted
