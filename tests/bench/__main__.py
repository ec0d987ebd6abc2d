"""`make bench` (`python -m tests.bench`): edgeagent against a naive baseline, on this machine.

One private Mosquitto and one sandbox serve both implementations in turn: the real `edgeagent run`
and tests/bench/baseline.py (a paho callback that signs and POSTs, auto-acking). It prints the table
and rewrites the generated blocks of BENCHMARKS.md. It reports; it asserts nothing.

    python -m tests.bench             default sizes (the issue's: 1,000 reads at 20/s, bursts of
                                      10,000, 50,000 entries for memory), under ~10 minutes on 2 cores
    python -m tests.bench --quick     small sizes, a smoke run of the whole bench (~2 minutes)
    python -m tests.bench --profile   instead, py-spy edgeagent's intake and drain and rewrite only the
                                      profile block (py-spy must be installed: `.venv/bin/pip install
                                      py-spy`; it is not a project dependency)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgeagent.localbroker import LocalBroker
from tests.bench import profile, report, scenarios
from tests.bench.harness import SandboxProc, disk_of, machine
from tests.bench.scenarios import Bench, CpuMeter, PySpy, Sizes, say

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, figures not comparable")
    parser.add_argument("--profile", action="store_true", help="only py-spy the intake and the drain (needs py-spy)")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="report file (BENCHMARKS.md)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, journals)")
    args = parser.parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes()
    spy = scenarios.py_spy_available() if args.profile else None
    if args.profile and spy is None:
        print("--profile needs py-spy: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    started = time.monotonic()
    info = machine()
    info["sizes"] = ", ".join(f"{k}={v:g}" for k, v in asdict(sizes).items()) + (" (--quick)" if args.quick else "")
    background = CpuMeter()
    time.sleep(2)
    results: dict[str, Any] = {"background_busy": background.busy(), "sizes_drain_in_flight": sizes.drain_in_flight}
    work = Path(tempfile.mkdtemp(prefix="edgeagent-bench-"))
    broker = LocalBroker(work / "broker")
    sandbox = SandboxProc(work / "sandbox")
    bench = Bench(work, broker, sandbox, sizes)
    profiles: dict[str, Path] = {}
    ok = False
    try:
        say(f"edgeagent bench in {work}: {info['cpu']}, {info['cores']} cores")
        broker.start()
        sandbox.start()
        info["disk"] = disk_of(work)
        if spy is not None:
            say(f"profiling intake ({sizes.intake_burst:,}) and drain ({sizes.drain_entries:,}) with py-spy …")

            def attach(proc: Any, name: str) -> PySpy:
                profiles[name] = work / f"profile-{name}.txt"
                return PySpy(spy, proc, profiles[name])

            results["profiled"] = scenarios.intake_and_drain(bench, attach)
            ok = True
            return 0
        results["floor"] = scenarios.floor(bench)
        say("cold start …")
        results["cold"] = {impl: scenarios.cold_start(bench, impl) for impl in ("edgeagent", "baseline")}
        results["latency"] = {}
        for impl in ("edgeagent", "baseline"):
            say(f"latency, {impl}: {sizes.latency_reads} reads at {sizes.latency_rate:g}/s …")
            results["latency"][impl] = scenarios.latency(bench, impl)
        say(
            f"durable intake ({sizes.intake_repeats} × {sizes.intake_burst:,}-read burst), the bare-thread ceiling "
            f"({sizes.ceiling_entries:,}) and the backlog drain, edgeagent …"
        )
        results.update(scenarios.intake_and_drain(bench))
        say(f"baseline: the same burst of {sizes.intake_burst:,} …")
        results["baseline_burst"] = scenarios.baseline_burst(bench)
        say(f"baseline: {sizes.baseline_drain_reads} reads against the slow sandbox …")
        results["baseline_drain"] = scenarios.baseline_drain(bench)
        say(f"soak, edgeagent: {sizes.soak_entries:,} entries end to end …")
        results["soak"] = scenarios.soak(bench)
        ok = True
    finally:
        if bench.camera is not None:
            bench.camera.close()
        sandbox.stop()
        broker.stop()
        info["elapsed"] = f"{(time.monotonic() - started) / 60:.1f} min"
        if ok and profiles:
            report.write(args.output, None, _profile_lines(results["profiled"], profiles, info))
            say(f"\nwrote the profile block of {args.output}")
        if args.keep or not ok:
            say(f"(work directory kept: {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)
    table_rows = report.rows(results)
    report.print_table(table_rows, info)
    report.write(args.output, report.figures(table_rows, results, info), None)
    say(f"\nwrote {args.output}")
    return 0


def _profile_lines(figures: dict[str, Any], profiles: dict[str, Path], info: dict[str, str]) -> list[str]:
    intake, drain = figures["intake"], figures["drain"]
    lines = [
        f"## Profile (generated by `python -m tests.bench --profile`, {info['date']})",
        "",
        "py-spy 100 Hz, non-blocking, attached to `edgeagent run` for the burst and for the drain; samples",
        f"of threads on the CPU only. Under the profiler: intake {intake['rate']:,.0f} reads/s, drain "
        f"{drain['rate']:,.0f} entries/s ({100 * drain['fraction']:.0f} % of ideal).",
        "",
    ]
    for name, path in profiles.items():
        lines += [f"### {name}", "", *profile.summary(path), ""]
    return lines


if __name__ == "__main__":
    sys.exit(main())
