"""Where the time goes: `py-spy record --format raw --threads` output, summed up.

py-spy samples only threads that are on the CPU (idle threads are left out), so shares are shares
of the agent's CPU time. Native code shows up as the Python frame that called it: the RSA
signature is the time spent "in" `wechatpay.sign`, the fsync in `Journal._transaction`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True)
class Profile:
    """Samples per thread group, per leaf function (self time) and per function anywhere on the stack."""

    samples: int
    threads: Counter[str]
    self_time: Counter[str]
    inclusive: Counter[str]


def _name(frame: str) -> str:
    """`func (path/to/file.py:123)` → `file.py:func`, shortened for the table."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    file = match["file"]
    for marker in ("site-packages/", "python3.11/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{file}:{match['func']}"


def parse(path: Path) -> Profile:
    threads: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        head = frames[0]  # "thread (tid): name"
        thread = re.sub(r"_\d+$", "_*", head.split(": ", 1)[1] if ": " in head else head)
        names = [_name(f) for f in frames[1:]]
        total += count
        threads[thread] += count
        if names:
            self_time[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    return Profile(total, threads, self_time, inclusive)


def summary(path: Path, top: int = 12) -> list[str]:
    """Markdown lines: CPU share per thread, top self-time frames, top edgeagent functions (inclusive)."""
    prof = parse(path)
    if prof.samples == 0:
        return [f"(no samples in {path.name})"]

    def pct(n: int) -> str:
        return f"{100 * n / prof.samples:.1f} %"

    lines = [f"{prof.samples} samples on the CPU.", "", "| thread | share of CPU samples |", "| --- | ---: |"]
    lines += [f"| {name} | {pct(n)} |" for name, n in prof.threads.most_common(8)]
    lines += ["", "| self time (leaf frame) | share |", "| --- | ---: |"]
    lines += [f"| `{name}` | {pct(n)} |" for name, n in prof.self_time.most_common(top)]
    ours = [(name, n) for name, n in prof.inclusive.most_common() if name.startswith("edgeagent/")]
    lines += ["", "| edgeagent function, inclusive | share |", "| --- | ---: |"]
    lines += [f"| `{name}` | {pct(n)} |" for name, n in ours[:top]]
    return lines
