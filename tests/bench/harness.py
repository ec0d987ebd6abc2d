"""The bench's moving parts: one Mosquitto, one sandbox process, the processes under test, a camera.

Everything runs on this machine, so the camera's publish time, the sandbox's arrival time and the
bench's own clock are the same `time.time()`. Both implementations run as child processes whose
`/proc/<pid>` counters (VmRSS, write_bytes, utime+stime) the bench reads; their logs go through a
pipe (as to journald), so a log line is not counted as a disk write of the process under test.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgeagent.localbroker import MOSQUITTO, free_port

PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Unique, valid mainland plates: province x issuing letter A-H x 5 digits = 24.8 million of them.
PROVINCES = "京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼"
LETTERS = "ABCDEFGH"


def plate(n: int) -> str:
    """The n-th plate of the bench (n < 24,800,000), e.g. plate(0) == "京A00000"."""
    return f"{PROVINCES[n // 800_000 % 31]}{LETTERS[n // 100_000 % 8]}{n % 100_000:05d}"


class Plates:
    """Hands out plates never used before in this bench run, so no read is ever a repeat."""

    def __init__(self) -> None:
        self._next = 0
        self._lock = threading.Lock()

    def take(self, count: int) -> list[str]:
        with self._lock:
            start, self._next = self._next, self._next + count
        return [plate(n) for n in range(start, start + count)]


def read_payload(plate_number: str, event_id: str) -> bytes:
    """A generic-format read as a camera bridge would publish it."""
    read = {"plate": plate_number, "color": "blue", "time": int(time.time()), "confidence": 0.95, "event_id": event_id}
    return json.dumps(read, ensure_ascii=False).encode()


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll `check` until it returns something truthy; TimeoutError names `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# -- what the machine is ---------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """CPU, cores, RAM, kernel and the versions the figures depend on."""
    import cryptography  # noqa: PLC0415

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    try:
        out = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, timeout=10).stdout
        mosquitto = out.splitlines()[0].replace("mosquitto version", "").strip() if out else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        mosquitto = "not found"
    virt = ""
    with contextlib.suppress(OSError):
        if "hypervisor" in Path("/proc/cpuinfo").read_text():
            virt = " (virtual machine)"
    return {
        "cpu": cpu + virt,
        "cores": str(os.cpu_count()),
        "ram": ram,
        "kernel": f"{platform.system()} {platform.release()} {platform.machine()}",
        "disk": disk_of(Path.cwd()),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "paho-mqtt": paho.__version__ if hasattr(paho, "__version__") else _dist_version("paho-mqtt"),
        "httpx": httpx.__version__,
        "cryptography": cryptography.__version__,
        "mosquitto": mosquitto,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def disk_of(path: Path) -> str:
    """The filesystem type and block device holding `path` (the journal's disk)."""
    best, found = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, kind = line.split()[:3]
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, found = mount, f"{kind} on {device}"
    return found


# -- the sandbox, in a process of its own ------------------------------------------------------------


class SandboxProc:
    """The sandbox as a child process (tests/bench/sandbox_server.py), with an interpreter and a GIL of its own.

    Knobs, the request log and the accepted entries go through its `/_sandbox/` control endpoints.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / "sandbox.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [PY, "-m", "tests.bench.sandbox_server", "--dir", str(self.dir), "--port", str(self.port)],
                stdout=log,
                stderr=log,
            )
        fragment = self.dir / "edgeagent-wechatpay.toml"
        wait_for(lambda: fragment.exists() and str(self.port) in fragment.read_text(), 60, "sandbox started")
        self._client = httpx.Client(verify=str(self.dir / "ca.pem"), timeout=60)
        wait_for(self._answers, 30, "sandbox answering", interval=0.1)

    def _answers(self) -> bool:
        try:
            return self.client.get(self.base_url + "/_sandbox/requests").status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def client(self) -> httpx.Client:
        assert self._client is not None, "sandbox not started"
        return self._client

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def fragment(self) -> dict[str, Any]:
        """The `[wechatpay]` table the sandbox wrote for agents (SPEC §8)."""
        text = (self.dir / "edgeagent-wechatpay.toml").read_text(encoding="utf-8")
        table: dict[str, Any] = tomllib.loads(text)["wechatpay"]
        return table

    def parking_id(self) -> str:
        return str(json.loads((self.dir / "materials.json").read_text(encoding="utf-8"))["parking_id"])

    def set(self, **knobs: object) -> None:
        self.client.post(self.base_url + "/_sandbox/control", json=knobs).raise_for_status()

    def requests(self) -> list[dict[str, Any]]:
        """The sandbox's ring of the last 10,000 API requests: at, status, out_serial_number, …"""
        response = self.client.get(self.base_url + "/_sandbox/requests")
        response.raise_for_status()
        rows: list[dict[str, Any]] = response.json()
        return rows

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


# -- /proc counters ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One reading of a process's counters."""

    at: float
    rss_kib: int
    write_bytes: int
    cpu_s: float


def sample(pid: int) -> Sample:
    """VmRSS (/proc/<pid>/status), write_bytes (/proc/<pid>/io), utime+stime (/proc/<pid>/stat)."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
            break
    written = 0
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            written = int(line.split()[1])
            break
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: fields 14 and 15 of stat(5)
    return Sample(time.time(), rss, written, cpu)


# -- the processes under test ------------------------------------------------------------------------


class NotifySocket:
    """A stand-in for systemd's $NOTIFY_SOCKET: an AF_UNIX datagram socket, drained by a thread.

    The drain matters: a full socket buffer would block the agent's sd_notify() calls.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.ready = threading.Event()
        self.ready_at: float | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"notify-{path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            at = time.monotonic()
            text = data.decode("utf-8", "replace")
            self.messages.append((at, text))
            if "READY=1" in text.split("\n") and not self.ready.is_set():
                self.ready_at = at
                self.ready.set()

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=2)
        self._sock.close()
        self.path.unlink(missing_ok=True)


class LogPipe:
    """Copies a child's stdout/stderr to a file in the bench's name; calls `on_line` for each line."""

    def __init__(self, stream: IO[bytes], path: Path, on_line: Callable[[bytes], None] | None = None) -> None:
        self._stream = stream
        self._path = path
        self._on_line = on_line
        self._thread = threading.Thread(target=self._run, name=f"log-{path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self._path.open("ab") as out:
            for line in self._stream:
                out.write(line)
                if self._on_line is not None:
                    self._on_line(line)

    def join(self) -> None:
        self._thread.join(timeout=10)


@dataclass
class Proc:
    """A process under test: started with a fake NOTIFY_SOCKET, sampled through /proc, stopped with SIGTERM."""

    name: str
    argv: list[str]
    work: Path
    env: dict[str, str] = field(default_factory=dict)
    on_stdout: Callable[[bytes], None] | None = None
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    notify: NotifySocket | None = None
    _pipes: list[LogPipe] = field(default_factory=list)

    def start(self) -> None:
        self.notify = NotifySocket(self.work / f"{self.name}.notify")
        env = {**os.environ, "EDGEAGENT_CLOCK_SYNCED": "1", "NOTIFY_SOCKET": str(self.notify.path), **self.env}
        env.pop("WATCHDOG_USEC", None)
        log = self.work / f"{self.name}.log"
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._pipes = [LogPipe(self.proc.stdout, log, self.on_stdout), LogPipe(self.proc.stderr, log)]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, timeout: float = 30.0) -> float:
        """Seconds from process start to READY=1 on the notify socket."""
        assert self.notify is not None and self.proc is not None
        deadline = time.monotonic() + timeout
        while not self.notify.ready.wait(0.05):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.work}/{self.name}.log")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} sent no READY=1 within {timeout:g} s")
        assert self.notify.ready_at is not None
        return self.notify.ready_at - self.started

    def sample(self) -> Sample:
        return sample(self.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait()
        for pipe in self._pipes:
            pipe.join()
        if self.notify is not None:
            self.notify.close()
        self.proc = None
        return code


def agent_proc(name: str, config: Path, work: Path) -> Proc:
    """The real `edgeagent run`, as systemd would start it (Type=notify)."""
    return Proc(name, [PY, "-m", "edgeagent", "run", "--config", str(config)], work)


def baseline_proc(name: str, config: Path, work: Path, on_stdout: Callable[[bytes], None] | None = None) -> Proc:
    """The naive baseline (tests/bench/baseline.py) with the same config file."""
    return Proc(name, [PY, "-m", "tests.bench.baseline", "--config", str(config)], work, on_stdout=on_stdout)


# -- configuration -------------------------------------------------------------------------------------


def _toml(value: object) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)  # JSON strings, numbers and booleans are TOML too


def _table(name: str, values: dict[str, Any]) -> str:
    return f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())


def write_config(
    path: Path,
    sandbox: SandboxProc,
    *,
    state_dir: Path,
    mqtt_port: int,
    topic: str,
    client_id: str,
    wechatpay: dict[str, Any] | None = None,
) -> Path:
    """An agent config: the sandbox's `[wechatpay]` fragment with `wechatpay` applied, one generic camera."""
    fragment = {**sandbox.fragment(), **(wechatpay or {})}
    parking = {"parking_id": sandbox.parking_id(), "repeat_window_s": 0}
    mqtt = {"host": "127.0.0.1", "port": mqtt_port, "client_id": client_id}
    path.write_text(
        f'state_dir = {_toml(str(state_dir))}\nserial_prefix = "BENCH"\n\n'
        + _table("wechatpay", fragment)
        + "\n"
        + _table("parking", parking)
        + "\n"
        + _table("mqtt", mqtt)
        + f'\n[[cameras]]\nid = "cam"\ntopic = {_toml(topic)}\nformat = "generic"\n\n'
        + '[[entrances]]\nnumber = "A01"\nname = "南门入口"\nsources = ["cam"]\n',
        encoding="utf-8",
    )
    return path


# -- the camera ---------------------------------------------------------------------------------------


class Camera:
    """A camera stand-in publishing at QoS 1; remembers when each read was handed to the broker."""

    def __init__(self, port: int, client_id: str) -> None:
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.max_inflight_messages_set(0)  # no client-side window: the burst goes out at once
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait_for(self.client.is_connected, 10, "camera connected")

    def publish(self, topic: str, payload: bytes) -> paho.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=1)

    def publish_all(self, topic: str, payloads: Iterable[bytes]) -> list[paho.MQTTMessageInfo]:
        return [self.client.publish(topic, p, qos=1) for p in payloads]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- the journal, read as `status` does ------------------------------------------------------------------


class JournalView:
    """Read-only look at an agent's journal (never blocks the daemon: WAL readers do not)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "journal.sqlite3"
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection | None:
        if self._db is None and self.path.exists():
            self._db = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro", uri=True, timeout=5)
        return self._db

    def count(self, where: str = "1") -> int:
        db = self._conn()
        if db is None:
            return 0
        try:
            return int(db.execute(f"SELECT count(*) FROM events WHERE {where}").fetchone()[0])
        except sqlite3.OperationalError:  # the schema is not there yet
            return 0

    def serial_to_plate(self) -> dict[str, str]:
        db = self._conn()
        assert db is not None
        rows = db.execute("SELECT out_serial_number, plate_number FROM events WHERE out_serial_number IS NOT NULL")
        return {str(s): str(p) for s, p in rows}

    def serial_to_received(self) -> dict[str, float]:
        """out_serial_number → when paho handed the read to the agent (time.time() in its callback)."""
        db = self._conn()
        assert db is not None
        rows = db.execute("SELECT out_serial_number, received_at FROM events WHERE out_serial_number IS NOT NULL")
        return {str(s): float(at) for s, at in rows}

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
