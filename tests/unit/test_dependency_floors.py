"""Issue 12: dependency floors past known CVEs, declared and installed."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
FLOORS = {"cryptography": (42, 0, 4), "h11": (0, 16, 0)}


def as_tuple(text: str) -> tuple[int, ...]:
    return (*(int(part) for part in re.findall(r"\d+", text)[:3]), 0, 0, 0)[:3]


@pytest.mark.parametrize("name", FLOORS)
def test_declared_floor_is_past_the_cve(name: str) -> None:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    [spec] = [d for d in deps if re.match(rf"{name}\b", d)]
    floor = re.search(r">=\s*([\d.]+)", spec)
    assert floor is not None and as_tuple(floor.group(1)) >= FLOORS[name], spec


@pytest.mark.parametrize("name", FLOORS)
def test_installed_version_meets_the_floor(name: str) -> None:
    assert as_tuple(version(name)) >= FLOORS[name]
