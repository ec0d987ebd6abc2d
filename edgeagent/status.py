"""`edgeagent status`: one object (SPEC §7) from the journal and the daemon's heartbeat file.

The daemon writes `<state_dir>/daemon.json` (its runtime view: MQTT link, uplink, clock) on every
change and at least every 10 s; everything countable comes from the journal, opened read-only.
`build` is pure over those inputs; `collect` does the reading; `render_text` fits 80×24.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from edgeagent import __version__, installation
from edgeagent.config import Config
from edgeagent.errors import JournalError
from edgeagent.journal import Journal
from edgeagent.requests import LOT_ENABLED, Kind

HEARTBEAT_FILE = "daemon.json"
HEARTBEAT_STALE_S = 60.0  # a daemon that has not written its heartbeat for this long is hung
OLDEST_PENDING_WARN_S = 300.0  # "the oldest pending entry is older than a few minutes"
CLOCK_OFFSET_WARN_S = 60.0
MQTT_DOWN_GRACE_S = 15.0
TAKEOVERS_WARN = 3  # "session taken over" drops in 10 min before status says so (mqtt.TAKEOVER_WINDOW_S)
LOW_DISK_BYTES = 50 * 1024 * 1024
LOW_DISK_FRACTION = 0.02


class DaemonView(TypedDict):
    running: bool
    pid: int | None
    since: str | None


class QueueView(TypedDict):
    pending: int
    oldest_pending_age_s: float | None
    dead: int
    rejected: int
    sent_24h: int


class CameraView(TypedDict):
    id: str
    last_read_at: str | None
    reads_24h: int


class LotView(TypedDict):
    """`GET /v3/parking/reminders/parking-lot` as last polled by the daemon (SPEC §7)."""

    enabled_state: str | None
    reason: str | None
    checked_at: str | None
    error: str | None


class LatencyView(TypedDict):
    """Camera read → verified answer over the last 24 h, in seconds (SPEC §7): from the enter or exit
    timestamp we reported to the answer, both on the API's clock, as WeChat measures it."""

    entry_p50_s: float | None
    entry_p95_s: float | None
    exit_p50_s: float | None
    exit_p95_s: float | None


class SessionsView(TypedDict):
    """Parking sessions (SPEC §7, §10): open ones, exits waiting, orphan exit reads, fuzzy matches."""

    open: int
    oldest_open_age_s: float | None
    exits_pending: int
    orphans: int
    fuzzy_24h: int


class StatusView(TypedDict):
    """The SPEC §7 status object; `mqtt`, `uplink` and `clock` are the daemon's heartbeat as it wrote them."""

    state: str
    version: str
    problems: list[str]
    daemon: DaemonView
    mqtt: dict[str, Any]
    uplink: dict[str, Any]
    clock: dict[str, Any]
    queue: QueueView
    cameras: list[CameraView]
    sessions: SessionsView
    lot: LotView
    latency: LatencyView
    disk: dict[str, Any]
    last_error: str | None
    client_id: NotRequired[str]  # in the retained copy on mqtt.status_topic: whose status it is
    versions: NotRequired[dict[str, str | None]]  # what runs: edgeagent, Python and the dependencies


# What status shows for a part the daemon did not report (not running, or an old heartbeat): one
# fallback per part, used wherever the part is missing.
NO_MQTT: dict[str, Any] = {"connected": False, "last_message_at": None}
NO_UPLINK: dict[str, Any] = {"last_success_at": None, "last_error": None, "base_url_in_use": None, "paused": False}
NO_CLOCK: dict[str, Any] = {"synchronized": None, "offset_s": None}
NO_LOT: LotView = {"enabled_state": None, "reason": None, "checked_at": None, "error": None}
NO_QUEUE: QueueView = {"pending": 0, "oldest_pending_age_s": None, "dead": 0, "rejected": 0, "sent_24h": 0}
NO_SESSIONS: SessionsView = {"open": 0, "oldest_open_age_s": None, "exits_pending": 0, "orphans": 0, "fuzzy_24h": 0}
NO_LATENCY: LatencyView = {"entry_p50_s": None, "entry_p95_s": None, "exit_p50_s": None, "exit_p95_s": None}


def percentile(sorted_values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile of an ascending list, or None for an empty one."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), int(fraction * len(sorted_values) + 0.999999)))
    return round(sorted_values[rank - 1], 3)


def latency_view(journal: Journal, now: float) -> LatencyView:
    """Entry and exit latency over the last 24 h, from the journal."""
    entries = journal.latencies(Kind.ENTRY, now - 86400)
    exits = journal.latencies(Kind.EXIT, now - 86400)
    return {
        "entry_p50_s": percentile(entries, 0.5),
        "entry_p95_s": percentile(entries, 0.95),
        "exit_p50_s": percentile(exits, 0.5),
        "exit_p95_s": percentile(exits, 0.95),
    }


def iso(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


HEARTBEAT_SIZE = 8192  # the file is padded to this size so it can be rewritten in place on a full disk


def write_heartbeat(state_dir: Path, data: dict[str, Any]) -> None:
    """Rewrite the heartbeat file in place (no fsync: it is rebuilt every few seconds).

    The file always has HEARTBEAT_SIZE bytes (JSON padded with spaces), so rewriting it needs no new
    disk blocks: when the disk is full, the heartbeat is exactly what must still get through to say so.
    """
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    if len(text) > HEARTBEAT_SIZE:
        text = json.dumps({k: data[k] for k in ("pid", "since", "started", "heartbeat") if k in data}).encode()
    fd = os.open(state_dir / HEARTBEAT_FILE, os.O_WRONLY | os.O_CREAT, 0o640)
    try:
        os.pwrite(fd, text.ljust(HEARTBEAT_SIZE), 0)
    finally:
        os.close(fd)


def read_heartbeat(state_dir: Path) -> dict[str, Any] | None:
    """The daemon's last heartbeat, or None; a read that races a rewrite is tried again."""
    for _ in range(5):
        try:
            data = json.loads((state_dir / HEARTBEAT_FILE).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            time.sleep(0.02)
            continue
        return data if isinstance(data, dict) else None
    return None


def disk_view(state_dir: Path) -> dict[str, Any]:
    """Free space where the journal lives; `low` below LOW_DISK_BYTES or LOW_DISK_FRACTION."""
    try:
        st = os.statvfs(state_dir)
    except OSError as exc:
        return {"state_dir": str(state_dir), "free_bytes": None, "free_pct": None, "low": None, "error": str(exc)}
    free = st.f_bavail * st.f_frsize
    total = st.f_blocks * st.f_frsize or 1
    low = free < LOW_DISK_BYTES or free / total < LOW_DISK_FRACTION
    return {"state_dir": str(state_dir), "free_bytes": free, "free_pct": round(100 * free / total, 1), "low": low}


def pid_is_edgeagent(pid: int) -> bool:
    """True when `pid` is alive and is an edgeagent process (not a recycled pid after kill -9)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust kill(0)
    return b"edgeagent" in cmdline


def build(
    config: Config,
    heartbeat: dict[str, Any] | None,
    daemon_alive: bool,
    queue: QueueView | None,
    cameras: dict[str, tuple[float, int]],
    journal_error: str | None,
    now: float,
    disk: dict[str, Any] | None = None,
    latency: LatencyView | None = None,
    sessions: SessionsView | None = None,
) -> StatusView:
    """The SPEC §7 status object, with `problems`: what a technician should look at, worst first."""
    hb = heartbeat or {}
    down: list[str] = []
    degraded: list[str] = []
    running = daemon_alive and heartbeat is not None
    if not running:
        down.append("daemon not running (start it: systemctl start edgeagent)")
    elif now - float(hb.get("heartbeat", 0)) > HEARTBEAT_STALE_S:
        down.append(f"daemon not responding (last heartbeat {int(now - float(hb.get('heartbeat', 0)))} s ago)")
    mqtt = dict(hb.get("mqtt") or NO_MQTT)
    if not running:
        mqtt["connected"] = False  # a dead process's last heartbeat is history, not the link's state
    if running and not mqtt.get("connected") and now - float(hb.get("started", now)) > MQTT_DOWN_GRACE_S:
        down.append(f"MQTT broker not connected: {mqtt.get('last_error') or 'connecting'}")
    if running and int(mqtt.get("takeovers_10min") or 0) >= TAKEOVERS_WARN:  # issue 12, docs/deploy.md
        degraded.append(
            f"MQTT session taken over {mqtt['takeovers_10min']} times in 10 min: another client connects as "
            f"{mqtt.get('client_id')!r} (a second agent, or a camera account; see docs/deploy.md, Security)"
        )
    journal_state = hb.get("journal") or {}
    if journal_error:
        down.append(f"journal unreadable: {journal_error}")
    elif running and journal_state.get("error"):
        down.append(f"journal not writable, intake stopped (broker keeps the reads): {journal_state['error']}")
    elif running and (hb.get("uplink") or {}).get("journal_error"):
        down.append(f"journal not writable, delivery outcomes waiting: {hb['uplink']['journal_error']}")
    if disk and disk.get("low"):
        degraded.append(f"disk space low in {disk['state_dir']}: {disk['free_bytes'] // (1024 * 1024)} MiB free")
    uplink = dict(hb.get("uplink") or NO_UPLINK)
    if uplink.get("paused"):
        degraded.append(f"delivery paused: {uplink.get('pause_cause') or uplink.get('last_error')}")
    lot: LotView = {**NO_LOT, **(hb.get("lot") or {})}
    if lot["enabled_state"] is not None and lot["enabled_state"] != LOT_ENABLED:
        degraded.append(f"WeChat lists the lot as {lot['enabled_state']}: {lot['reason'] or 'no reason given'}")
    clock = dict(hb.get("clock") or NO_CLOCK)
    if clock.get("offset_s") is not None and abs(float(clock["offset_s"])) > CLOCK_OFFSET_WARN_S:
        degraded.append(f"clock is {float(clock['offset_s']):+.0f} s off the API's clock")
    q = queue or NO_QUEUE
    oldest = q["oldest_pending_age_s"]
    if oldest is not None and oldest > OLDEST_PENDING_WARN_S:
        degraded.append(f"{q['pending']} entries pending, oldest {int(oldest)} s")
    if q.get("dead"):
        degraded.append(f"{q['dead']} dead-lettered entries (see: edgeagent events --state dead)")
    parked = sessions or NO_SESSIONS
    if parked["orphans"]:
        # Fits the 80-column text view; README says what to do (attach, dismiss or close).
        n = parked["orphans"]
        degraded.append(f"{n} exit read{'s' if n > 1 else ''} with no session: edgeagent sessions --orphans")
    state = "down" if down else "degraded" if degraded else "ok"
    camera_list: list[CameraView] = []
    for cam in config.cameras:
        last, reads = cameras.get(cam.id, (None, 0))
        camera_list.append({"id": cam.id, "last_read_at": iso(last), "reads_24h": reads})
    return {
        "state": state,
        "version": __version__,
        "problems": down + degraded,
        "daemon": {
            "running": running,
            "pid": hb.get("pid") if running else None,
            "since": hb.get("since") if running else None,
        },
        "mqtt": mqtt,
        "uplink": uplink,
        "clock": clock,
        "queue": q,
        "cameras": camera_list,
        "sessions": parked,
        "lot": lot,
        "latency": latency or NO_LATENCY,
        "disk": disk or {},
        "last_error": (down + degraded + [None])[0] if (down or degraded) else hb.get("last_error"),
    }


@dataclass(frozen=True, slots=True)
class Counted:
    """The countable parts of status, from the journal (None where it could not be read)."""

    queue: QueueView | None = None
    cameras: dict[str, tuple[float, int]] = field(default_factory=dict)
    latency: LatencyView | None = None
    sessions: SessionsView | None = None
    error: str | None = None


def from_journal(journal: Journal, now: float, *, latency: bool = True, sessions: bool = True) -> Counted:
    """Queue, cameras and, unless not asked for, sessions (a scan of the open ones) and latency (a sort
    of a day of answers): the daemon, which rebuilds status on every batch, asks for those less often."""
    try:
        queue: QueueView = journal.queue_summary(now)  # type: ignore[assignment]
        parked: SessionsView | None = journal.session_counts(now) if sessions else None  # type: ignore[assignment]
        lat = latency_view(journal, now) if latency else None
        return Counted(queue, journal.camera_summary(now), lat, parked)
    except JournalError as exc:
        return Counted(error=str(exc))


def collect(config: Config, now: float | None = None) -> StatusView:
    """Read the heartbeat and the journal (read-only) and build the status object."""
    now = time.time() if now is None else now
    heartbeat = read_heartbeat(config.state_dir)
    alive = heartbeat is not None and pid_is_edgeagent(int(heartbeat.get("pid", 0)))
    counted = Counted()
    if config.journal_path.exists():
        try:
            journal = Journal(config.journal_path, readonly=True)
            try:
                counted = from_journal(journal, now)
            finally:
                journal.close()
        except JournalError as exc:
            counted = Counted(error=str(exc))
    elif alive:
        counted = Counted(error=f"{config.journal_path} does not exist")
    c = counted
    disk = disk_view(config.state_dir)
    status = build(config, heartbeat, alive, c.queue, c.cameras, c.error, now, disk, c.latency, c.sessions)
    return installation.annotate(status)  # versions running, credential files the unit cannot find


def _age(iso_time: str | None, now: float) -> str:
    if not iso_time:
        return "never"
    try:
        ts = time.mktime(time.strptime(iso_time, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    except ValueError:
        return iso_time
    seconds = max(0, int(now - ts))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    if seconds < 172800:
        return f"{seconds // 3600}h ago"
    return f"{seconds // 86400}d ago"


def render_text(status: StatusView, now: float | None = None) -> str:
    """The human view: state and problems first, then one line per part; fits an 80×24 terminal."""
    now = time.time() if now is None else now
    lines = [f"edgeagent {status['version']}: {status['state'].upper()}"]
    lines += [f"  ! {problem}"[:80] for problem in status["problems"][:5]]
    d = status["daemon"]
    lines.append(
        f"daemon   {'running pid ' + str(d['pid']) + ' since ' + str(d['since']) if d['running'] else 'NOT RUNNING'}"
    )
    m = status["mqtt"]
    lines.append(
        f"mqtt     {'connected' if m.get('connected') else 'DISCONNECTED'}, "
        f"last message {_age(m.get('last_message_at'), now)}"
    )
    u = status["uplink"]
    uplink = f"last success {_age(u.get('last_success_at'), now)}"
    if u.get("base_url_in_use"):
        uplink += f" via {u['base_url_in_use']}"
    lines.append(f"uplink   {uplink}"[:80])
    if u.get("last_error"):
        lines.append(f"         last error: {u['last_error']}"[:80])
    lot, lat = status["lot"], status["latency"]
    wechat = f"lot {lot['enabled_state'] or 'not checked yet'}"
    if lot["reason"]:
        wechat += f" ({lot['reason']})"
    lines.append(f"wechat   {wechat}"[:80])
    latency = [
        f"{kind} p50 {p50:.1f}s p95 {p95 or 0:.1f}s"
        for kind, p50, p95 in (
            ("entry", lat["entry_p50_s"], lat["entry_p95_s"]),
            ("exit", lat["exit_p50_s"], lat["exit_p95_s"]),
        )
        if p50 is not None
    ]
    if latency:
        lines.append(f"latency  {', '.join(latency)} (24h)"[:80])  # camera read → verified answer
    p = status["sessions"]
    lines.append(
        f"sessions {p['open']} open, {p['exits_pending']} exits waiting, {p['orphans']} orphans, "
        f"{p['fuzzy_24h']} fuzzy 24h"[:80]
    )
    c = status["clock"]
    offset = "unknown" if c.get("offset_s") is None else f"{float(c['offset_s']):+.1f}s"
    synced = {True: "synchronised", False: "NOT synchronised", None: "unknown"}[c.get("synchronized")]
    lines.append(f"clock    {synced}, offset to API {offset}")
    q = status["queue"]
    age = q["oldest_pending_age_s"]
    oldest = "" if age is None else f" (oldest {int(age)}s)"
    lines.append(
        f"queue    {q['pending']} pending{oldest}, {q['sent_24h']} sent 24h, {q['dead']} dead, {q['rejected']} rejected"
    )
    disk = status.get("disk") or {}
    if disk.get("free_bytes") is not None:
        mib = disk["free_bytes"] // (1024 * 1024)
        lines.append(
            f"disk     {mib} MiB free ({disk['free_pct']}%) in {disk['state_dir']}{'  LOW' if disk['low'] else ''}"[:80]
        )
    lines.append("cameras")
    cams = status["cameras"]
    for cam in cams[:10]:
        lines.append(
            f"  {cam['id']:<24} last read {_age(cam['last_read_at'], now):<10} {cam['reads_24h']:>6} reads 24h"
        )
    if len(cams) > 10:
        lines.append(f"  … and {len(cams) - 10} more (edgeagent status --json)")
    return "\n".join(lines[:24])


_ENTRY_ONLY = (
    "out_serial_number", "plate_color", "vehicle_type", "car_type", "entrance_number", "entrance_name",
    "enter_timestamp", "time_source", "clock_synced", "attempts", "next_attempt_at", "last_error", "serial_number",
    "sent_at", "time_corrected", "depends_on", "uncertain", "acceptance", "answered_at",
)  # fmt: skip
_EXIT_FIELDS = ("exit_number", "exit_timestamp", "match", "clamped", "candidates", "hold_until")
_ENTRY_FIELDS = ("vehicle_type", "car_type", "entrance_number", "entrance_name", "enter_timestamp")


def event_view(row: dict[str, Any]) -> dict[str, Any]:
    """One journal row as `events --json` shows it (SPEC §2): times in ISO 8601, only the fields of its kind."""
    data = dict(row)
    for key in ("received_at", "updated_at", "sent_at", "next_attempt_at", "answered_at"):
        if key in data:
            data[key] = iso(data[key])
    if data["state"] == "rejected":
        for key in (*_ENTRY_ONLY, *_EXIT_FIELDS):
            data.pop(key, None)
        return data
    data.pop("reason", None)
    data.pop("detail", None)
    data["hold_until"] = iso(data.get("hold_until"))
    if data.get("kind") == "exit":
        # An exit's plate_number is the plate as read at the exit; its request carries the session's.
        for key in _ENTRY_FIELDS:
            data.pop(key, None)
        data["clamped"] = bool(data["clamped"])
        data["candidates"] = json.loads(data["candidates"]) if data.get("candidates") else []
    else:
        for key in _EXIT_FIELDS:
            data.pop(key, None)
    data["clock_synced"] = bool(data["clock_synced"])
    data["time_corrected"] = bool(data["time_corrected"])
    data["uncertain"] = bool(data["uncertain"])
    if data.get("acceptance") == "duplicate":
        # Refused as an already used number after an attempt that got no verified answer: WeChat has it,
        # but the serial_number it gave that attempt never reached us (SPEC §5).
        data["serial_number_note"] = "accepted by an earlier attempt; serial_number unknown"
    return data


def session_view(row: dict[str, Any], box: str) -> dict[str, Any]:
    """One `sessions` row as `sessions --json` shows it (SPEC §2); `box`: the serial_prefix of the box
    that opened the session (this one: sessions learnt from other boxes come with issue 11)."""
    from edgeagent.journal import session_state  # noqa: PLC0415 - the journal's row shape, read-only use

    exit_state = row["exit_state"]
    return {
        "out_serial_number": row["out_serial_number"],
        "state": session_state(row),
        "plate_number": row["plate_number"] or row["exit_plate_read"],
        "entrance_number": row["entrance_number"],
        "enter_timestamp": row["enter_timestamp"],
        "entry_state": row["entry_state"],
        "exit_id": row["exit_id"],
        "exit_number": row["exit_number"] or None,
        "exit_timestamp": row["exit_timestamp"],
        "exit_state": exit_state,
        "exit_plate_read": row["exit_plate_read"],
        "match": row["match"] if row["exit_id"] is not None else None,
        "clamped": bool(row["clamped"]) if row["exit_id"] is not None else False,
        "candidates": json.loads(row["candidates"]) if row.get("candidates") else [],
        "box": box,
        "received_at": iso(row["received_at"]),
    }
