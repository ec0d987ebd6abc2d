"""`edgeagent status`: one object (SPEC §7) from the journal and the daemon's heartbeat file.

The daemon writes `<state_dir>/daemon.json` (its runtime view: MQTT link, uplink, clock) on every
change and at least every 10 s; everything countable comes from the journal, opened read-only.
`build` is pure over those inputs; `collect` does the reading; `render_text` fits 80×24.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from edgeagent import __version__, installation
from edgeagent.config import Config
from edgeagent.errors import JournalError
from edgeagent.journal import Journal

HEARTBEAT_FILE = "daemon.json"
HEARTBEAT_STALE_S = 60.0  # a daemon that has not written its heartbeat for this long is hung
OLDEST_PENDING_WARN_S = 300.0  # "the oldest pending entry is older than a few minutes"
CLOCK_OFFSET_WARN_S = 60.0
MQTT_DOWN_GRACE_S = 15.0
LOW_DISK_BYTES = 50 * 1024 * 1024
LOW_DISK_FRACTION = 0.02


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
    queue: dict[str, Any] | None,
    cameras: dict[str, tuple[float, int]],
    journal_error: str | None,
    now: float,
    disk: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The SPEC §7 status object, with `problems`: what a technician should look at, worst first."""
    hb = heartbeat or {}
    down: list[str] = []
    degraded: list[str] = []
    running = daemon_alive and heartbeat is not None
    if not running:
        down.append("daemon not running (start it: systemctl start edgeagent)")
    elif now - float(hb.get("heartbeat", 0)) > HEARTBEAT_STALE_S:
        down.append(f"daemon not responding (last heartbeat {int(now - float(hb.get('heartbeat', 0)))} s ago)")
    mqtt = dict(hb.get("mqtt") or {"connected": False, "last_message_at": None})
    if not running:
        mqtt["connected"] = False  # a dead process's last heartbeat is history, not the link's state
    if running and not mqtt.get("connected") and now - float(hb.get("started", now)) > MQTT_DOWN_GRACE_S:
        down.append(f"MQTT broker not connected: {mqtt.get('last_error') or 'connecting'}")
    journal_state = hb.get("journal") or {}
    if journal_error:
        down.append(f"journal unreadable: {journal_error}")
    elif running and journal_state.get("error"):
        down.append(f"journal not writable, intake stopped (broker keeps the reads): {journal_state['error']}")
    elif running and (hb.get("uplink") or {}).get("journal_error"):
        down.append(f"journal not writable, delivery outcomes waiting: {hb['uplink']['journal_error']}")
    if disk and disk.get("low"):
        degraded.append(f"disk space low in {disk['state_dir']}: {disk['free_bytes'] // (1024 * 1024)} MiB free")
    uplink = dict(hb.get("uplink") or {"last_success_at": None, "last_error": None, "base_url_in_use": None})
    if uplink.get("paused"):
        degraded.append(f"delivery paused: {uplink.get('pause_cause') or uplink.get('last_error')}")
    clock = dict(hb.get("clock") or {"synchronized": None, "offset_s": None})
    if clock.get("offset_s") is not None and abs(float(clock["offset_s"])) > CLOCK_OFFSET_WARN_S:
        degraded.append(f"clock is {float(clock['offset_s']):+.0f} s off the API's clock")
    q = queue or {"pending": 0, "oldest_pending_age_s": None, "dead": 0, "rejected": 0, "sent_24h": 0}
    if (q.get("oldest_pending_age_s") or 0) > OLDEST_PENDING_WARN_S:
        degraded.append(f"{q['pending']} entries pending, oldest {int(q['oldest_pending_age_s'])} s")
    if q.get("dead"):
        degraded.append(f"{q['dead']} dead-lettered entries (see: edgeagent events --state dead)")
    state = "down" if down else "degraded" if degraded else "ok"
    camera_list = []
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
        "disk": disk or {},
        "last_error": (down + degraded + [None])[0] if (down or degraded) else hb.get("last_error"),
    }


def collect(config: Config, now: float | None = None) -> dict[str, Any]:
    """Read the heartbeat and the journal (read-only) and build the status object."""
    now = time.time() if now is None else now
    heartbeat = read_heartbeat(config.state_dir)
    alive = heartbeat is not None and pid_is_edgeagent(int(heartbeat.get("pid", 0)))
    queue: dict[str, Any] | None = None
    cameras: dict[str, tuple[float, int]] = {}
    journal_error = None
    if config.journal_path.exists():
        try:
            journal = Journal(config.journal_path, readonly=True)
            try:
                queue = journal.queue_summary(now)
                cameras = journal.camera_summary(now)
            finally:
                journal.close()
        except JournalError as exc:
            journal_error = str(exc)
    elif alive:
        journal_error = f"{config.journal_path} does not exist"
    status = build(config, heartbeat, alive, queue, cameras, journal_error, now, disk_view(config.state_dir))
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


def render_text(status: dict[str, Any], now: float | None = None) -> str:
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
    c = status["clock"]
    offset = "unknown" if c.get("offset_s") is None else f"{float(c['offset_s']):+.1f}s"
    synced = {True: "synchronised", False: "NOT synchronised", None: "unknown"}[c.get("synchronized")]
    lines.append(f"clock    {synced}, offset to API {offset}")
    q = status["queue"]
    oldest = "" if q.get("oldest_pending_age_s") is None else f" (oldest {int(q['oldest_pending_age_s'])}s)"
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
