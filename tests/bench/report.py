"""Turn the raw figures of `scenarios.py` into the table, print it, and write BENCHMARKS.md.

BENCHMARKS.md has two generated blocks between HTML comment markers (the figures, and the profile
when `--profile` ran); everything outside them is prose that a re-run leaves alone.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.bench.scenarios import median, percentile

FIGURES = ("<!-- bench:figures:begin -->", "<!-- bench:figures:end -->")
PROFILE = ("<!-- bench:profile:begin -->", "<!-- bench:profile:end -->")


@dataclass(frozen=True)
class Row:
    """One line of the table: a figure for both implementations and edgeagent's target."""

    metric: str
    unit: str
    edgeagent: float | None
    baseline: float | None
    target: str
    holds: bool | None  # None: no target
    note: str = ""
    baseline_note: str = ""
    digits: int = 1

    def value(self, v: float | None, note: str = "") -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "n/a" + (f" ({note})" if note else "")
        text = f"{v:,.{self.digits}f}"
        return text + (f" ({note})" if note else "")

    @property
    def ratio(self) -> str:
        if self.edgeagent is None or self.baseline is None or self.baseline == 0:
            return "–"
        return f"{self.edgeagent / self.baseline:.2f}×"

    @property
    def verdict(self) -> str:
        if self.holds is None:
            return "(no target)"
        return "holds" if self.holds else "MISSED"


def rows(results: dict[str, Any]) -> list[Row]:
    """The table, from the results dict assembled by `__main__`."""
    out: list[Row] = []
    lat_e, lat_b = results["latency"]["edgeagent"]["ms"], results["latency"]["baseline"]["ms"]
    for q, target in ((50, 5.0), (99, 20.0)):
        e, b = percentile(lat_e, q), percentile(lat_b, q)
        out.append(Row(f"latency p{q}, publish → sandbox, 20 reads/s", "ms", e, b, f"≤ {target:g} ms", e <= target))
    e, b = max(lat_e, default=math.nan), max(lat_b, default=math.nan)
    out.append(Row("latency max, 20 reads/s", "ms", e, b, "–", None))
    intake = results["intake"]
    burst = results["baseline_burst"]
    out.append(
        Row(
            f"durable intake, burst of {intake['reads']:,}, median of {len(intake['rates'])}",
            "reads/s",
            intake["rate"],
            None,
            "≥ 2,000/s",
            intake["rate"] >= 2000,
            digits=0,
            baseline_note=f"no journal; acks {burst['rate']:,.0f}/s, one POST each",
        )
    )
    drain, bdrain, ceil = results["drain"], results["baseline_drain"], results["ceiling"]
    out.append(
        Row(
            f"backlog drain, {drain['entries']:,} entries, 50 ms, 16 in flight",
            "% of ideal",
            100 * drain["fraction"],
            100 * bdrain["fraction"],
            "≥ 90 %",
            drain["fraction"] >= 0.9,
            note=f"{drain['rate']:,.0f}/s of {drain['ideal']:,.0f}/s; 16 bare threads: {ceil['rate']:,.0f}/s, "
            f"sandbox at 0 ms: {results['capacity']['rate']:,.0f}/s",
            baseline_note=f"{bdrain['rate']:,.1f}/s, 1 at a time, {bdrain['entries']} reads",
        )
    )
    soak = results["soak"]
    mib = 1024.0
    out.append(
        Row(
            f"VmRSS after {soak['entries']:,} entries",
            "MiB",
            soak["rss_kib"] / mib,
            burst["rss_kib"] / mib,
            "≤ 40 MiB",
            soak["rss_kib"] / mib <= 40,
            baseline_note=f"after its {burst['reads']:,}",
        )
    )
    growth_e = (soak["rss_kib"] - soak["rss_half_kib"]) / mib
    growth_b = (burst["rss_kib"] - burst["rss_half_kib"]) / mib
    out.append(
        Row(
            "VmRSS growth over the second half",
            "MiB",
            growth_e,
            growth_b,
            "flat (≤ 1 MiB)",
            growth_e <= 1.0,
            digits=2,
        )
    )
    out.append(
        Row(
            "disk writes per entry, intake + delivery",
            "KiB",
            soak["write_bytes_per_entry"] / 1024,
            burst["write_bytes_per_entry"] / 1024,
            "≤ 8 KiB",
            soak["write_bytes_per_entry"] <= 8 * 1024,
            digits=2,
        )
    )
    cold_e, cold_b = results["cold"]["edgeagent"], results["cold"]["baseline"]
    out.append(
        Row(
            f"cold start → READY=1, median of {len(cold_e)}",
            "s",
            median(cold_e),
            median(cold_b),
            "≤ 1 s",
            median(cold_e) <= 1.0,
            note=f"max {max(cold_e):.2f}",
            digits=2,
        )
    )
    out.append(
        Row(
            "CPU per 1,000 entries, end to end",
            "CPU-s",
            soak["cpu_s_per_1000"],
            burst["cpu_s_per_1000"],
            "–",
            None,
            digits=2,
        )
    )
    return out


def table(table_rows: list[Row]) -> list[str]:
    lines = [
        "| figure | unit | edgeagent | naive baseline | edgeagent ÷ baseline | target (edgeagent) | verdict |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for r in table_rows:
        lines.append(
            f"| {r.metric} | {r.unit} | {r.value(r.edgeagent, r.note)} | {r.value(r.baseline, r.baseline_note)} "
            f"| {r.ratio} | {r.target} | {r.verdict} |"
        )
    return lines


def details(results: dict[str, Any]) -> list[str]:
    """The supporting numbers behind each figure."""
    intake, drain, soak, burst = results["intake"], results["drain"], results["soak"], results["baseline_burst"]
    lat = results["latency"]
    mib = 1024.0
    floor, ceil = results["floor"], results["ceiling"]
    return [
        f"- Latency: {lat['edgeagent']['matched']} and {lat['baseline']['matched']} reads matched to the sandbox's "
        f"request log (edgeagent, baseline), after 20 warm-up reads each; sandbox at 0 ms latency. edgeagent's "
        f"median splits into {lat['edgeagent']['mqtt_ms']:.1f} ms camera → agent (MQTT) and "
        f"{lat['edgeagent']['agent_ms']:.1f} ms agent → sandbox (journal commit, wake-up, signature, request). "
        f"On this machine one synchronous=FULL commit takes {floor['commit_ms']:.1f} ms and one RSA-2048 "
        f"signature {floor['sign_ms']:.1f} ms (medians): journal-before-send costs at least the commit.",
        f"- Intake: bursts at {', '.join(f'{r:,.0f}' for r in intake['rates'])} reads/s. In the median one the "
        f"{intake['reads']:,} reads were handed to the broker in {intake['publish_s']:.2f} s and were "
        f"all committed journal rows {intake['seconds']:.2f} s after the first publish; intake alone wrote "
        f"{intake['write_bytes_per_entry'] / 1024:.2f} KiB and used {intake['cpu_s_per_1000']:.2f} CPU-s per 1,000 "
        "reads (uplink down meanwhile, so delivery stayed out of the way).",
        f"- Drain: {drain['entries']:,} pending entries ({drain['attempted_during_outage']} of them tried once during "
        f"the outage) sent in {drain['seconds']:.1f} s; {drain['requests_seen']:,} requests, {drain['non_200']} not "
        f"200. CPU per 1,000 entries: agent {drain['agent_cpu_s_per_1000']:.2f} s, sandbox "
        f"{drain['sandbox_cpu_s_per_1000']:.2f} s; the machine was {100 * drain['machine_busy']:.0f} % busy. "
        f"Ceiling: {ceil['entries']:,} entries POSTed by {results['sizes_drain_in_flight']} bare threads (no MQTT, "
        f"no journal) reach {ceil['rate']:,.0f}/s = {100 * ceil['fraction']:.0f} % of ideal on this machine; "
        f"edgeagent's drain is {100 * drain['rate'] / ceil['rate']:.0f} % of that. The same threads against the "
        f"sandbox at 0 ms reach {results['capacity']['rate']:,.0f}/s: above that the sandbox (a threaded Python "
        "HTTPS server that verifies and signs every request) cannot answer on these cores, whatever the client.",
        f"- Soak: {soak['entries']:,} reads published as one burst, all journaled after {soak['journaled_s']:.1f} s, "
        f"all delivered after {soak['seconds']:.1f} s ({soak['rate']:,.0f} entries/s end to end). VmRSS "
        f"{soak['rss_start_kib'] / mib:.1f} MiB at start, {soak['rss_half_kib'] / mib:.1f} MiB at half, "
        f"{soak['rss_kib'] / mib:.1f} MiB at the end, peak {soak['rss_peak_kib'] / mib:.1f} MiB.",
        f"- Baseline burst: {burst['reads']:,} reads acknowledged at {burst['rate']:,.0f}/s ({burst['failed']} "
        f"failed); its VmRSS {burst['rss_half_kib'] / mib:.1f} → {burst['rss_kib'] / mib:.1f} MiB over the "
        f"second half, peak {burst['rss_peak_kib'] / mib:.1f} MiB. Its memory, disk and CPU figures are over "
        "this burst: a 50,000-read baseline run would take minutes at its one-request-at-a-time pace.",
        f"- Cold start (s): edgeagent {', '.join(f'{t:.2f}' for t in results['cold']['edgeagent'])}; baseline "
        f"{', '.join(f'{t:.2f}' for t in results['cold']['baseline'])}.",
        f"- Machine load from other processes before the bench: {100 * results['background_busy']:.0f} % of CPU.",
    ]


def machine_lines(info: dict[str, str]) -> list[str]:
    return [
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['ram']} RAM, {info['kernel']}; journal on "
        f"{info['disk']}",
        f"- Versions: Python {info['python']}, SQLite {info['sqlite']}, paho-mqtt {info['paho-mqtt']}, "
        f"httpx {info['httpx']}, cryptography {info['cryptography']}, mosquitto {info['mosquitto']}",
        f"- Date: {info['date']}; sizes: {info['sizes']}; whole run {info['elapsed']}",
    ]


def print_table(table_rows: list[Row], info: dict[str, str]) -> None:
    widths = (44, 12, 28, 40, 8, 16, 12)
    head = ("figure", "unit", "edgeagent", "naive baseline", "ratio", "target", "verdict")
    print()
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for r in table_rows:
        cells = (r.metric, r.unit, r.value(r.edgeagent, r.note), r.value(r.baseline, r.baseline_note), r.ratio,
                 r.target, r.verdict)  # fmt: skip
        print("  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)))
    print()
    for line in machine_lines(info):
        print(line)


def _replace_block(text: str, markers: tuple[str, str], body: list[str]) -> str:
    begin, end = markers
    block = "\n".join([begin, *body, end])
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    return text.rstrip("\n") + "\n\n" + block + "\n"


def figures(table_rows: list[Row], results: dict[str, Any], info: dict[str, str]) -> list[str]:
    """The generated figures block of BENCHMARKS.md."""
    return [
        "## Figures (generated by `make bench`)",
        "",
        *machine_lines(info),
        "",
        *table(table_rows),
        "",
        *details(results),
    ]


def write(path: Path, figures_block: list[str] | None, profile_block: list[str] | None) -> None:
    """Replace the generated blocks given (creating BENCHMARKS.md with a heading if missing)."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if figures_block is not None:
        text = _replace_block(text, FIGURES, figures_block)
    if profile_block is not None:
        text = _replace_block(text, PROFILE, profile_block)
    path.write_text(text, encoding="utf-8")
