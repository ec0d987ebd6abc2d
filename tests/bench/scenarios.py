"""The measurements: each runs edgeagent (`edgeagent run`) or the naive baseline against the bench's
one Mosquitto and one sandbox, and returns raw figures for `report.py` to judge and print.

Every phase gets its own camera topic, MQTT client id and state directory, so nothing a phase
published can reach a later one (edgeagent keeps a persistent broker session per client id).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeagent.localbroker import LocalBroker, free_port
from tests.bench.harness import (
    Camera,
    JournalView,
    Plates,
    Proc,
    Sample,
    SandboxProc,
    agent_proc,
    baseline_proc,
    read_payload,
    sample,
    wait_for,
    write_config,
)

FAST = {"max_in_flight": 16, "max_rate_per_s": 1000}  # every phase: the uplink limits stay out of the way


@dataclass(frozen=True)
class Sizes:
    """How much work each figure is measured over (`--quick` shrinks them for a smoke run)."""

    cold_starts: int = 5
    latency_reads: int = 1000
    latency_rate: float = 20.0
    intake_burst: int = 10_000
    drain_entries: int = 10_000
    drain_latency_s: float = 0.05
    drain_in_flight: int = 16
    soak_entries: int = 50_000
    intake_repeats: int = 3
    baseline_drain_reads: int = 200
    ceiling_entries: int = 2_000

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            cold_starts=2,
            latency_reads=100,
            intake_burst=1000,
            drain_entries=1000,
            soak_entries=3000,
            intake_repeats=1,
            baseline_drain_reads=40,
            ceiling_entries=300,
        )


def say(text: str) -> None:
    print(text, flush=True)


class PostCounter:
    """Counts the baseline's `posted …` / `failed …` stdout lines as they arrive."""

    def __init__(self) -> None:
        self.posted = 0
        self.failed = 0
        self.failures: list[str] = []

    def __call__(self, line: bytes) -> None:
        if line.startswith(b"posted "):
            self.posted += 1
        elif line.startswith(b"failed "):
            self.failed += 1
            if len(self.failures) < 5:
                self.failures.append(line.decode("utf-8", "replace").strip())

    @property
    def done(self) -> int:
        return self.posted + self.failed


class CpuMeter:
    """Whole-machine CPU use between two readings of /proc/stat (how saturated the 2 cores were)."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields), idle

    def busy(self) -> float:
        total, idle = self._read()
        d_total, d_idle = total - self._start[0], idle - self._start[1]
        return 0.0 if d_total <= 0 else 1 - d_idle / d_total


@dataclass
class Bench:
    """The shared fixtures of one bench run."""

    work: Path
    broker: LocalBroker
    sandbox: SandboxProc
    sizes: Sizes
    plates: Plates = field(default_factory=Plates)
    _names: Iterator[int] = field(default_factory=itertools.count)
    camera: Camera | None = None

    def cam(self) -> Camera:
        if self.camera is None:
            self.camera = Camera(self.broker.port, "bench-camera")
        return self.camera

    def phase(self, name: str, wechatpay: dict[str, Any] | None = None) -> tuple[Path, Path, str]:
        """(config file, state dir, camera topic) of a new phase, with its own client id and topic."""
        tag = f"{name}{next(self._names)}"
        directory = self.work / tag
        directory.mkdir(parents=True)
        topic = f"bench/{tag}/plate"
        state = directory / "state"
        config = write_config(
            directory / "edgeagent.toml",
            self.sandbox,
            state_dir=state,
            mqtt_port=self.broker.port,
            topic=topic,
            client_id=f"bench-{tag}",
            wechatpay={**FAST, **(wechatpay or {})},
        )
        return config, state, topic

    def reads(self, tag: str, count: int) -> list[tuple[str, str, bytes]]:
        """(event_id, plate, payload) for `count` fresh reads; event ids are letters and digits only."""
        return [(f"{tag}{i:06d}", p, read_payload(p, f"{tag}{i:06d}")) for i, p in enumerate(self.plates.take(count))]


def _warm_up_edgeagent(bench: Bench, topic: str, journal: JournalView) -> None:
    """A no-plate read, journaled as rejected: then the agent's subscription is known to be in place.

    READY comes before the broker session exists, and a read published before the subscription is
    lost, so it is sent again every 0.5 s until it is journaled (a second copy is absorbed as a duplicate).
    """
    before = journal.count()
    deadline = time.monotonic() + 30
    while True:
        bench.cam().publish(topic, b'{"plate": ""}')
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: journal.count() > before, 0.5, "warm-up read journaled")
            return
        if time.monotonic() > deadline:
            raise TimeoutError("the warm-up read was never journaled: is the agent subscribed?")


def _publish_paced(bench: Bench, topic: str, reads: list[tuple[str, str, bytes]], rate: float) -> dict[str, float]:
    """Publish one read every 1/rate s on an absolute schedule; returns event_id → publish time."""
    camera = bench.cam()
    published: dict[str, float] = {}
    start = time.monotonic()
    for i, (event_id, _, payload) in enumerate(reads):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        published[event_id] = time.time()
        camera.publish(topic, payload)
    return published


def _arrivals(sandbox: SandboxProc, serials: set[str]) -> dict[str, float]:
    """out_serial_number → first arrival time at the sandbox, for accepted requests among `serials`."""
    found: dict[str, float] = {}
    for request in sandbox.requests():
        serial = request.get("out_serial_number")
        if serial in serials and request.get("status") == 200 and serial not in found:
            found[serial] = float(request["at"])
    return found


# -- cold start -------------------------------------------------------------------------------------


def cold_start(bench: Bench, impl: str) -> list[float]:
    """Seconds from process start to READY=1, `cold_starts` times (a fresh journal each time)."""
    times = []
    for _ in range(bench.sizes.cold_starts):
        config, _, _ = bench.phase(f"cold{impl}")
        proc = (agent_proc if impl == "edgeagent" else baseline_proc)(impl, config, config.parent)
        proc.start()
        try:
            times.append(proc.wait_ready())
        finally:
            proc.stop()
    return times


# -- latency ----------------------------------------------------------------------------------------


def latency(bench: Bench, impl: str) -> dict[str, Any]:
    """Camera publish → request received by the sandbox, at `latency_rate` reads/s, in ms."""
    sizes = bench.sizes
    config, state, topic = bench.phase(f"lat{impl}")
    counter = PostCounter()
    proc = (
        agent_proc(impl, config, config.parent)
        if impl == "edgeagent"
        else baseline_proc(impl, config, config.parent, counter)
    )
    journal = JournalView(state)
    proc.start()
    try:
        proc.wait_ready()
        # Warm-up: the subscription, the TLS connection and the code paths, at the same pace.
        warm = bench.reads(f"w{impl}", 20)
        base = 0
        if impl == "edgeagent":
            wait_for(lambda: journal.count() >= 0 and journal.path.exists(), 30, "journal created")
            _warm_up_edgeagent(bench, topic, journal)
            _publish_paced(bench, topic, warm, sizes.latency_rate)
            wait_for(lambda: journal.count("state = 'sent'") >= len(warm), 60, "warm-up delivered")
        else:
            wait_for(lambda: _subscribed_baseline(bench, topic, counter), 30, "baseline subscribed", interval=0.2)
            base = counter.done
            _publish_paced(bench, topic, warm, sizes.latency_rate)
            wait_for(lambda: counter.done >= base + len(warm), 60, "warm-up delivered")
        reads = bench.reads(f"l{impl}", sizes.latency_reads)
        published = _publish_paced(bench, topic, reads, sizes.latency_rate)
        if impl == "edgeagent":
            wait_for(lambda: journal.count("state = 'sent'") >= len(warm) + len(reads), 120, "reads delivered")
            by_plate = {p: e for e, p, _ in reads}
            event_of = {s: by_plate[p] for s, p in journal.serial_to_plate().items() if p in by_plate}
            received = {event_of[s]: at for s, at in journal.serial_to_received().items() if s in event_of}
        else:
            wait_for(lambda: counter.done >= base + len(warm) + len(reads), 120, "reads delivered")
            event_of = {"BL" + e: e for e, _, _ in reads}
        arrivals = _arrivals(bench.sandbox, set(event_of))
        lat = sorted((at - published[event_of[s]]) * 1000 for s, at in arrivals.items())
        result: dict[str, Any] = {"ms": lat, "reads": len(reads), "matched": len(lat), "failed": counter.failed}
        if impl == "edgeagent":  # where the time goes: camera → agent (MQTT), agent → sandbox (the rest)
            result["mqtt_ms"] = median([(received[e] - published[e]) * 1000 for e in received])
            result["agent_ms"] = median([(at - received[event_of[s]]) * 1000 for s, at in arrivals.items()])
    finally:
        proc.stop()
        journal.close()
    return result


def _subscribed_baseline(bench: Bench, topic: str, counter: PostCounter) -> bool:
    """The baseline has a clean session, so it only gets what is published after it subscribed: probe."""
    before = counter.done
    _, _, payload = bench.reads("probe", 1)[0]
    bench.cam().publish(topic, payload)
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: counter.done > before, 0.5, "probe")
        return True
    return False


# -- durable intake and backlog drain -------------------------------------------------------------------


def _intake(bench: Bench, profile: Callable[[Proc, str], Any] | None) -> tuple[dict[str, Any], Path, Path, str]:
    """One burst of `intake_burst` reads into a fresh agent with the uplink down (a closed port), timed
    until every read is a committed journal row. Returns the figures and the phase's config, state, topic."""
    sizes = bench.sizes
    closed = f"https://127.0.0.1:{free_port()}"
    config, state, topic = bench.phase("intake", {"base_url": closed})
    journal = JournalView(state)
    agent = agent_proc("edgeagent", config, config.parent)
    agent.start()
    try:
        agent.wait_ready()
        wait_for(journal.path.exists, 30, "journal created")
        _warm_up_edgeagent(bench, topic, journal)
        reads = bench.reads("burst", sizes.intake_burst)
        profiler = profile(agent, "intake") if profile else None
        before = agent.sample()
        camera = bench.cam()
        t0 = time.time()
        infos = camera.publish_all(topic, (p for _, _, p in reads))
        t_handed = time.time()
        wait_for(lambda: journal.count("state = 'pending'") >= len(reads), 600, "burst journaled", interval=0.005)
        t_end = time.time()
        after = agent.sample()
        if profiler is not None:
            profiler.stop()
        for info in infos:
            info.wait_for_publish(timeout=60)
    finally:
        agent.stop()
        journal.close()
    figures = {
        "reads": len(reads),
        "seconds": t_end - t0,
        "rate": len(reads) / (t_end - t0),
        "publish_s": t_handed - t0,
        "write_bytes_per_entry": (after.write_bytes - before.write_bytes) / len(reads),
        "cpu_s_per_1000": (after.cpu_s - before.cpu_s) / len(reads) * 1000,
        "rss_kib": after.rss_kib,
    }
    return figures, config, state, topic


def intake_and_drain(bench: Bench, profile: Callable[[Proc, str], Any] | None = None) -> dict[str, Any]:
    """edgeagent: `intake_repeats` bursts (a fresh agent and journal each; the median counts), then the
    last burst's journal drained against the sandbox at `drain_latency_s` per request with
    `drain_in_flight` requests at once."""
    sizes = bench.sizes
    runs = [_intake(bench, profile) for _ in range(1 if profile else sizes.intake_repeats)]
    rates = [run[0]["rate"] for run in runs]
    _, config, state, topic = runs[-1]
    middle = sorted(runs, key=lambda run: run[0]["rate"])[len(runs) // 2][0]
    result: dict[str, Any] = {"intake": {**middle, "rates": rates}}
    journal = JournalView(state)
    # The outage ends. Entries tried during the burst got a backoff; make all of them due now, as they
    # are once the outage has lasted longer than the backoff (the bench writes while the agent is down).
    attempted = _make_all_due(state)
    pending = journal.count("state = 'pending'")
    config = write_config(
        config,
        bench.sandbox,
        state_dir=state,
        mqtt_port=bench.broker.port,
        topic=topic,
        client_id=f"bench-drain-{config.parent.name}",
        wechatpay={**FAST, "max_in_flight": sizes.drain_in_flight},
    )
    if profile is None:  # right before the drain, so both see the same load on the machine
        result["capacity"] = ceiling(bench, 0.0)
        result["ceiling"] = ceiling(bench)
    bench.sandbox.set(latency_s=sizes.drain_latency_s)
    agent = agent_proc("edgeagent-drain", config, config.parent)
    sandbox_before = sample(bench.sandbox.pid())
    agent.start()
    try:
        agent.wait_ready()
        profiler = profile(agent, "drain") if profile else None
        cpu = CpuMeter()
        start = agent.sample()
        wait_for(lambda: journal.count("state = 'pending'") == 0, 900, "backlog drained", interval=0.02)
        t_end = time.time()
        busy = cpu.busy()
        end = agent.sample()
        if profiler is not None:
            profiler.stop()
        sandbox_after = sample(bench.sandbox.pid())
        epoch = _epoch(state)
        requests = [r for r in bench.sandbox.requests() if str(r.get("out_serial_number", "")).startswith(epoch)]
        sent = journal.count("state = 'sent'")
        t_first = min(float(r["at"]) for r in requests)
        ideal = sizes.drain_in_flight / sizes.drain_latency_s
        rate = pending / (t_end - t_first)
        result["drain"] = {
            "entries": pending,
            "attempted_during_outage": attempted,
            "sent": sent,
            "requests_seen": len(requests),
            "non_200": sum(1 for r in requests if r.get("status") != 200),
            "seconds": t_end - t_first,
            "rate": rate,
            "ideal": ideal,
            "fraction": rate / ideal,
            "agent_cpu_s_per_1000": (end.cpu_s - start.cpu_s) / pending * 1000,
            "sandbox_cpu_s_per_1000": (sandbox_after.cpu_s - sandbox_before.cpu_s) / pending * 1000,
            "machine_busy": busy,
            "rss_kib": end.rss_kib,
        }
    finally:
        agent.stop()
        bench.sandbox.set(latency_s=0)
        journal.close()
    return result


def _make_all_due(state: Path) -> int:
    db = sqlite3.connect(state / "journal.sqlite3")
    try:
        with db:
            attempted = int(
                db.execute("SELECT count(*) FROM events WHERE state = 'pending' AND attempts > 0").fetchone()[0]
            )
            db.execute("UPDATE events SET next_attempt_at = 0 WHERE state = 'pending'")
        return attempted
    finally:
        db.close()


def _epoch(state: Path) -> str:
    """The out_serial_number prefix of this journal: serial_prefix + the journal's epoch."""
    db = sqlite3.connect(f"{(state / 'journal.sqlite3').absolute().as_uri()}?mode=ro", uri=True)
    try:
        return "BENCH" + str(db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0])
    finally:
        db.close()


def baseline_burst(bench: Bench) -> dict[str, Any]:
    """The baseline given the same burst: how fast it acknowledges (after a POST each), and what it
    costs in memory, CPU and disk over it (it has no journal, so nothing of it is durable)."""
    sizes = bench.sizes
    config, _, topic = bench.phase("blburst")
    counter = PostCounter()
    proc = baseline_proc("baseline", config, config.parent, counter)
    proc.start()
    try:
        proc.wait_ready()
        wait_for(lambda: _subscribed_baseline(bench, topic, counter), 30, "baseline subscribed", interval=0.2)
        reads = bench.reads("blb", sizes.intake_burst)
        base = counter.done
        first = proc.sample()
        half: Sample | None = None
        peak = first.rss_kib
        t0 = time.time()
        bench.cam().publish_all(topic, (p for _, _, p in reads))
        while counter.done < base + len(reads):
            if not proc.alive():
                raise RuntimeError("the baseline died; see its log")
            time.sleep(0.05)
            now = proc.sample()
            peak = max(peak, now.rss_kib)
            if half is None and counter.done >= base + len(reads) // 2:
                half = now
        t_end = time.time()
        last = proc.sample()
        assert half is not None
    finally:
        proc.stop()
    return {
        "reads": len(reads),
        "rate": len(reads) / (t_end - t0),
        "seconds": t_end - t0,
        "failed": counter.failed,
        "failures": counter.failures,
        "rss_kib": last.rss_kib,
        "rss_half_kib": half.rss_kib,
        "rss_peak_kib": peak,
        "write_bytes_per_entry": (last.write_bytes - first.write_bytes) / len(reads),
        "cpu_s_per_1000": (last.cpu_s - first.cpu_s) / len(reads) * 1000,
    }


def baseline_drain(bench: Bench) -> dict[str, Any]:
    """The baseline against the slow sandbox: one request at a time, whatever is waiting."""
    sizes = bench.sizes
    config, _, topic = bench.phase("bldrain")
    counter = PostCounter()
    proc = baseline_proc("baseline", config, config.parent, counter)
    proc.start()
    try:
        proc.wait_ready()
        wait_for(lambda: _subscribed_baseline(bench, topic, counter), 30, "baseline subscribed", interval=0.2)
        bench.sandbox.set(latency_s=sizes.drain_latency_s)
        reads = bench.reads("bld", sizes.baseline_drain_reads)
        base = counter.done
        bench.cam().publish_all(topic, (p for _, _, p in reads))
        wait_for(lambda: counter.done >= base + len(reads), 600, "baseline drained", interval=0.02)
        t_end = time.time()
        arrivals = _arrivals(bench.sandbox, {"BL" + e for e, _, _ in reads})
    finally:
        bench.sandbox.set(latency_s=0)
        proc.stop()
    ideal = sizes.drain_in_flight / sizes.drain_latency_s
    rate = len(reads) / (t_end - min(arrivals.values()))
    return {"entries": len(reads), "rate": rate, "ideal": ideal, "fraction": rate / ideal, "failed": counter.failed}


def ceiling(bench: Bench, latency_s: float | None = None) -> dict[str, Any]:
    """`drain_in_flight` bare threads POSTing back to back against the sandbox (tests/bench/ceiling.py) at
    `latency_s` (default: the drain's): what a client without MQTT, journal or loop reaches on this
    machine, with TLS, RSA and the sandbox sharing its cores. At 0 s it is the sandbox's capacity."""
    sizes = bench.sizes
    latency = sizes.drain_latency_s if latency_s is None else latency_s
    config, _, _ = bench.phase("ceiling")
    bench.sandbox.set(latency_s=latency)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "tests.bench.ceiling", "--config", str(config), "--count",
             str(sizes.ceiling_entries), "--threads", str(sizes.drain_in_flight), "--tag", config.parent.name],
            capture_output=True, text=True, timeout=600, check=True,
        ).stdout  # fmt: skip
    finally:
        bench.sandbox.set(latency_s=0)
    done = json.loads(out.strip().splitlines()[-1])
    ideal = sizes.drain_in_flight / sizes.drain_latency_s
    rate = done["count"] / done["seconds"]
    return {"entries": done["count"], "rate": rate, "fraction": rate / ideal, "failed": done["failed"]}


def floor(bench: Bench) -> dict[str, float]:
    """The two costs every entry pays before its request can leave: a synchronous=FULL commit on this
    disk (where the journals live) and one RSA-2048 signature, in ms (medians)."""
    import tomllib  # noqa: PLC0415

    from edgeagent import wechatpay  # noqa: PLC0415

    path = bench.work / "floor.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    commits = []
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)")
        for _ in range(50):
            start = time.perf_counter()
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t (body) VALUES (?)", (bytes(300),))
            db.execute("COMMIT")
            commits.append((time.perf_counter() - start) * 1000)
    finally:
        db.close()
    fragment = tomllib.loads((bench.sandbox.dir / "edgeagent-wechatpay.toml").read_text(encoding="utf-8"))
    key = wechatpay.load_private_key(Path(fragment["wechatpay"]["merchant_private_key"]).read_bytes())
    signs = []
    for _ in range(100):
        start = time.perf_counter()
        wechatpay.sign(key, bytes(400))
        signs.append((time.perf_counter() - start) * 1000)
    return {"commit_ms": median(commits), "sign_ms": median(signs)}


# -- the long run: memory, bytes and CPU per entry ----------------------------------------------------------


def soak(bench: Bench) -> dict[str, Any]:
    """edgeagent end to end over `soak_entries` reads (published as one burst, delivered as fast as the
    sandbox answers): VmRSS when half and all of them are sent, write_bytes and CPU per entry."""
    sizes = bench.sizes
    config, state, topic = bench.phase("soak")
    journal = JournalView(state)
    agent = agent_proc("edgeagent-soak", config, config.parent)
    agent.start()
    rss: list[tuple[int, int]] = []  # (entries sent, VmRSS KiB)
    try:
        agent.wait_ready()
        wait_for(journal.path.exists, 30, "journal created")
        start = agent.sample()
        _warm_up_edgeagent(bench, topic, journal)
        reads = bench.reads("soak", sizes.soak_entries)
        t0 = time.time()
        publisher = threading.Thread(target=lambda: bench.cam().publish_all(topic, (p for _, _, p in reads)))
        publisher.start()
        half: tuple[int, int] | None = None
        journaled_at: float | None = None
        while True:
            sent = journal.count("state = 'sent'")
            now = agent.sample()
            rss.append((sent, now.rss_kib))
            if half is None and sent >= len(reads) // 2:
                half = (sent, now.rss_kib)
            if journaled_at is None and journal.count() >= len(reads) + 1:
                journaled_at = time.time()
            if sent >= len(reads):
                break
            if not agent.alive():
                raise RuntimeError("edgeagent died during the soak; see its log")
            time.sleep(0.5)
        t_end = time.time()
        end = agent.sample()
        publisher.join()
        assert half is not None
    finally:
        agent.stop()
        journal.close()
    n = len(reads)
    return {
        "entries": n,
        "seconds": t_end - t0,
        "rate": n / (t_end - t0),
        "journaled_s": (journaled_at or t_end) - t0,
        "rss_kib": end.rss_kib,
        "rss_half_kib": half[1],
        "rss_peak_kib": max(r for _, r in rss),
        "rss_start_kib": start.rss_kib,
        "write_bytes_per_entry": (end.write_bytes - start.write_bytes) / n,
        "cpu_s_per_1000": (end.cpu_s - start.cpu_s) / n * 1000,
        "rss_curve": rss,
    }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted `values` (q in 0..100)."""
    if not values:
        return float("nan")
    rank = max(1, min(len(values), round(q / 100 * len(values) + 0.5)))
    return values[rank - 1]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def py_spy_available() -> str | None:
    """The path of py-spy next to this interpreter or on PATH, if it is installed."""
    import shutil  # noqa: PLC0415

    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


class PySpy:
    """`py-spy record` attached to a running process, stopped with SIGINT; raw collapsed stacks."""

    def __init__(self, exe: str, proc: Proc, out: Path, rate: int = 100) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(proc.pid), "--rate", str(rate), "--format", "raw", "--threads",
             "--nonblocking", "--output", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.5)  # let it attach before the phase starts

    def stop(self) -> None:
        import signal  # noqa: PLC0415

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
