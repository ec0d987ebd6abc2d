"""The `edgeagent` command: one handler per subcommand, each returning an exit code (SPEC §2).

Exit codes: 0 ok; 1 degraded; 2 failed / critical; 64 usage error; 78 configuration error.
Errors are one line on stderr naming the file, the key and the problem.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from edgeagent import __version__
from edgeagent.config import Config, load, resolve_path
from edgeagent.errors import ConfigError, EdgeAgentError, JournalError, KeyFileError
from edgeagent.model import Direction

EXIT_OK, EXIT_DEGRADED, EXIT_FAILED, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 64, 78
SIMULATE_USER, SIMULATE_PASSWORD = "edgeagent-simulate", "simulate.password"
STATE_EXIT = {"ok": EXIT_OK, "degraded": EXIT_DEGRADED, "down": EXIT_FAILED}

log = logging.getLogger("edgeagent")


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors; SPEC §2 says 64 (EX_USAGE)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


class _KeyValueFormatter(logging.Formatter):
    """`level logger event key=value…`; timestamps only when not under journald (it adds its own)."""

    def __init__(self, timestamps: bool) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s" if timestamps else "%(levelname)s %(name)s %(message)s"
        )


def setup_logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter(timestamps="JOURNAL_STREAM" not in os.environ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("edgeagent.paho").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _config(args: argparse.Namespace, *, check_files: bool = True) -> Config:
    return load(resolve_path(getattr(args, "config", None)), check_files=check_files)


# -- handlers ------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    # Imported here so that `status` and `events` stay free of paho and httpx imports.
    from edgeagent import daemon  # noqa: PLC0415

    setup_logging(args.verbose)
    protect_process()
    config = _config(args)
    return daemon.run(config)


def protect_process() -> None:
    """No core dumps and private files, also outside systemd (issue 12).

    A core dump would hold the merchant key and the broker password in clear. The unit sets
    LimitCORE=0 and UMask=0027 (group-readable journal for `status`); started by hand from a shell
    with umask 022 the journal came out 0644, readable by every user of the box: outside systemd
    ($INVOCATION_ID unset) the daemon's files are 0600.
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if not os.environ.get("INVOCATION_ID"):
        os.umask(0o077)


def cmd_status(args: argparse.Namespace) -> int:
    from edgeagent import status  # noqa: PLC0415

    config = _config(args, check_files=False)
    view = status.collect(config)
    if args.json:
        print(json.dumps(view, ensure_ascii=False, indent=2))
    else:
        print(status.render_text(view))
    return STATE_EXIT[view["state"]]


def cmd_check(args: argparse.Namespace) -> int:
    from edgeagent import check  # noqa: PLC0415

    return check.run(resolve_path(args.config), online=args.online)


def _listing_config(args: argparse.Namespace, command: str) -> Config | int:
    """The config of a read command that lists journal rows (`events`, `sessions`), or its exit code:
    no journal yet (an empty JSON array with --json) or a --limit below 1."""
    config = _config(args, check_files=False)
    if not config.journal_path.exists():
        print(f"edgeagent: no journal yet at {config.journal_path} (has `edgeagent run` started?)", file=sys.stderr)
        if args.json:
            print("[]")
        return EXIT_FAILED
    if args.limit < 1:
        print(f"edgeagent {command}: --limit must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    return config


def cmd_events(args: argparse.Namespace) -> int:
    from edgeagent.journal import Journal  # noqa: PLC0415

    config = _listing_config(args, "events")
    if isinstance(config, int):
        return config
    from edgeagent.status import event_view, pid_is_edgeagent, read_heartbeat  # noqa: PLC0415

    heartbeat = read_heartbeat(config.state_dir)
    if heartbeat is None or not pid_is_edgeagent(int(heartbeat.get("pid") or 0)):
        print("edgeagent: note: the daemon is not running; these rows are as it left them", file=sys.stderr)
    journal = Journal(config.journal_path, readonly=True)
    try:
        rows = [event_view(row) for row in journal.events(args.state, args.limit)]
    finally:
        journal.close()
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return EXIT_OK
    if not rows:
        print(f"no {args.state or ''} events".replace("  ", " "))
        return EXIT_OK
    for row in rows:
        when = (row["received_at"] or "")[:19].replace("T", " ")
        where = f"{row['camera'] or '-'}{':' + row['lane'] if row['lane'] else ''}"
        if row["state"] == "rejected":
            what = f"{row['reason']}: {row['detail']}"
        else:
            what = (
                f"{row['kind']} {row['plate_number']} → {row['entrance_number']} {row['out_serial_number']} "
                f"tries={row['attempts']}"
            )
            if row["serial_number"]:
                what += f" wx={row['serial_number']}"
            elif row.get("acceptance") == "duplicate":
                what += " wx=unknown (accepted earlier)"
            if row["last_error"] and row["state"] != "sent":
                what += f" error={row['last_error']}"
        print(terminal_safe(f"{row['id']:>7} {when} {row['state']:<8} {where:<16} {what}"[:200]))
    return EXIT_OK


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}


def terminal_safe(text: str) -> str:
    """`text` with control characters shown as \\xNN (issue 12).

    Rows carry what a camera sent (lane, plate, a decoder's detail quoting the payload): an escape
    sequence in there must not retitle, clear or rewrite the technician's terminal. --json needs
    no help: json.dumps escapes every control character.
    """
    return text.translate(_CONTROL)


def cmd_retry(args: argparse.Namespace) -> int:
    from edgeagent import requests  # noqa: PLC0415
    from edgeagent.journal import Journal  # noqa: PLC0415
    from edgeagent.routing import Router  # noqa: PLC0415

    if not (args.dead or args.all) and not args.ids:
        print("edgeagent retry: give request ids, --dead or --all", file=sys.stderr)
        return EXIT_USAGE
    if args.ids and (args.dead or args.all):
        print("edgeagent retry: give ids or --dead/--all, not both", file=sys.stderr)
        return EXIT_USAGE
    # --rebuild needs the config's values (parking_id, entrances), not the key files.
    config = _config(args, check_files=False)
    if not config.journal_path.exists():
        print(f"edgeagent: no journal at {config.journal_path}", file=sys.stderr)
        return EXIT_FAILED
    router = Router.build(config)

    def rebuild(kind: requests.Kind, body: bytes, camera: str | None, lane: str | None) -> bytes:
        parking_id = config.parking.parking_id
        if kind is requests.Kind.EXIT:
            return requests.rebuild_exit_body(body, parking_id)
        entrance = router.entrance_for(camera, lane) if camera else None
        return requests.rebuild_entry_body(body, parking_id, entrance)

    journal = Journal(config.journal_path)
    try:
        moved, kept = journal.requeue(
            args.ids or None, time.time(), include_pending=args.all, rebuild=rebuild if args.rebuild else None
        )
    except ValueError as exc:  # a body the current config cannot build (the config is still wrong)
        print(f"edgeagent retry --rebuild: {exc}; nothing was changed", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        journal.close()
    missing = sorted(set(args.ids) - set(moved)) if args.ids else []
    what = "dead or pending" if args.all else "dead"
    print(
        f"re-queued {len(moved)} {what} request{'' if len(moved) == 1 else 's'}"
        + (f": {', '.join(map(str, moved))}" if moved and len(moved) <= 20 else "")
        + (", bodies rebuilt from the current config" if args.rebuild else "")
    )
    if kept:
        print(
            f"kept the old body of {len(kept)} (an earlier attempt may have been accepted with it): "
            + ", ".join(map(str, kept[:20])),
        )
    if missing:
        print(f"not re-queueable (or unknown), left as they are: {', '.join(map(str, missing))}", file=sys.stderr)
        return EXIT_DEGRADED
    return EXIT_OK


def _exit_rules_and_journal(args: argparse.Namespace) -> tuple[Any, Any] | int:
    from edgeagent.exits import ExitRules  # noqa: PLC0415
    from edgeagent.journal import Journal  # noqa: PLC0415

    config = _config(args, check_files=False)
    if not config.journal_path.exists():
        print(f"edgeagent: no journal at {config.journal_path}", file=sys.stderr)
        return EXIT_FAILED
    return ExitRules.from_config(config), Journal(config.journal_path)


def cmd_sessions(args: argparse.Namespace) -> int:
    from edgeagent.journal import Journal  # noqa: PLC0415
    from edgeagent.status import session_view  # noqa: PLC0415

    config = _listing_config(args, "sessions")
    if isinstance(config, int):
        return config
    view = "open" if args.open else "closed" if args.closed else "orphans" if args.orphans else None
    plate = None
    if args.plate:
        from edgeagent import plates  # noqa: PLC0415

        plate = plates.normalise(args.plate)
    journal = Journal(config.journal_path, readonly=True)
    try:
        rows = [session_view(r, config.serial_prefix) for r in journal.sessions(view, plate, args.limit)]
    finally:
        journal.close()
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return EXIT_OK
    if not rows:
        print("no sessions" if view is None else f"no {view} sessions")
        return EXIT_OK
    for r in rows:
        enter = time.strftime("%m-%d %H:%M", time.localtime(r["enter_timestamp"])) if r["enter_timestamp"] else "-"
        leave = time.strftime("%m-%d %H:%M", time.localtime(r["exit_timestamp"])) if r["exit_timestamp"] else "-"
        plate = terminal_safe(r["plate_number"] or "-")
        what = f"{r['state']:<12} {plate:<10} in {r['entrance_number'] or '-'} {enter}"
        what += f"  out {r['exit_number'] or '-'} {leave}"
        if r["match"] and r["match"] != "exact":
            what += f" ({r['match']}: read {terminal_safe(r['exit_plate_read'] or '')})"
        if r["candidates"]:
            what += f" candidates {', '.join(r['candidates'])}"
        ident = r["out_serial_number"] or f"exit #{r['exit_id']}"
        print(f"{ident:<24} {what}"[:200])
    return EXIT_OK


def cmd_attach(args: argparse.Namespace) -> int:
    opened = _exit_rules_and_journal(args)
    if isinstance(opened, int):
        return opened
    rules, journal = opened
    try:
        problem = journal.attach(args.exit_id, args.out_serial, rules, time.time())
    finally:
        journal.close()
    if problem:
        print(f"edgeagent attach: {problem}", file=sys.stderr)
        return EXIT_FAILED
    print(f"exit #{args.exit_id} attached to {args.out_serial}: its exit goes out once the entry is accepted")
    return EXIT_OK


def cmd_dismiss(args: argparse.Namespace) -> int:
    opened = _exit_rules_and_journal(args)
    if isinstance(opened, int):
        return opened
    _, journal = opened
    try:
        problem = journal.dismiss(args.exit_id, time.time())
    finally:
        journal.close()
    if problem:
        print(f"edgeagent dismiss: {problem}", file=sys.stderr)
        return EXIT_FAILED
    print(f"exit #{args.exit_id} dismissed: kept, nothing sent")
    return EXIT_OK


def cmd_close(args: argparse.Namespace) -> int:
    at = time.time()
    if args.at:
        from edgeagent.decoders._common import parse_time  # noqa: PLC0415
        from edgeagent.errors import DecodeError  # noqa: PLC0415

        try:
            at = parse_time(args.at, "--at", numeric_text=True)
        except DecodeError as exc:
            print(f"edgeagent close: --at: {exc}", file=sys.stderr)
            return EXIT_USAGE
    opened = _exit_rules_and_journal(args)
    if isinstance(opened, int):
        return opened
    rules, journal = opened
    try:
        result = journal.close_session(args.out_serial, at, rules, time.time())
    finally:
        journal.close()
    if isinstance(result, str):
        print(f"edgeagent close: {result}", file=sys.stderr)
        return EXIT_FAILED
    print(f"session {args.out_serial} closed by exit #{result} (manual): it goes out once the entry is accepted")
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace) -> int:
    from edgeagent import simulate  # noqa: PLC0415
    from edgeagent.mqtt import publish_once  # noqa: PLC0415

    config = _config(args, check_files=False)
    camera = config.camera(args.camera)
    if camera is None:
        known = ", ".join(c.id for c in config.cameras)
        print(f"{config.source}: cameras: no camera with id {args.camera!r} (known: {known})", file=sys.stderr)
        return EXIT_USAGE
    try:
        color = simulate.parse_color(args.color) if args.color else None
    except ValueError as exc:
        print(f"edgeagent simulate: --color: {exc}", file=sys.stderr)
        return EXIT_USAGE
    record_id = f"sim-{int(time.time() * 1000)}"
    direction = Direction(args.direction) if args.direction else None
    try:
        topic, payload = simulate.render(
            camera.format,
            camera.topic,
            plate=args.plate,
            color=color,
            lane=args.lane,
            when=time.time(),
            record_id=record_id,
            direction=direction,
        )
    except ValueError as exc:  # a direction (or colour) the camera's format cannot carry
        print(f"edgeagent simulate: camera {camera.id!r}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # Its own broker account where install.sh made one (issue 12): the agent's may no longer write
    # camera topics. simulate.password sits next to the config, root:root 0600 (run it with sudo).
    account = config.mqtt
    secret = config.source.parent / SIMULATE_PASSWORD
    if secret.exists():
        account = dataclasses.replace(account, username=SIMULATE_USER, password_file=secret)
    try:
        publish_once(account, topic, payload, client_id=f"{config.mqtt.client_id}-simulate")
    except OSError as exc:
        print(f"edgeagent simulate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"published to {topic} ({camera.format}, {len(payload)} bytes, acknowledged by the broker)")
    return EXIT_OK


def cmd_sandbox(args: argparse.Namespace) -> int:
    from edgeagent.sandbox import server  # noqa: PLC0415

    setup_logging()
    return server.serve(Path(args.dir), args.port)


def cmd_demo(args: argparse.Namespace) -> int:
    from edgeagent import demo  # noqa: PLC0415

    return demo.run(keep=args.keep)


# -- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgeagent", description="Parking-gate agent: plate reads → journal → WeChat Pay.")
    parser.add_argument("--version", action="version", version=f"edgeagent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            metavar="PATH",
            help="config file (default: $EDGEAGENT_CONFIG, else /etc/edgeagent/edgeagent.toml)",
        )

    p = add("run", cmd_run, "run the agent (systemd Type=notify aware)")
    with_config(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p = add("status", cmd_status, "health, MQTT, uplink, clock, queue and cameras on one screen")
    with_config(p)
    p.add_argument("--json", action="store_true", help="print the status object as JSON")
    p = add("check", cmd_check, "validate the config, keys and files")
    with_config(p)
    p.add_argument("--online", action="store_true", help="also try the broker and the API host")
    p = add("events", cmd_events, "list journal rows, newest first")
    with_config(p)
    p.add_argument("--state", choices=["pending", "sent", "dead", "rejected"])
    p.add_argument("--limit", type=int, default=50, metavar="N")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p = add("retry", cmd_retry, "re-queue dead-lettered requests, keeping their out_serial_number")
    with_config(p)
    p.add_argument("ids", nargs="*", type=int, metavar="ID")
    p.add_argument("--dead", action="store_true", help="re-queue every dead request")
    p.add_argument("--all", action="store_true", help="re-queue every dead and pending request, due at once")
    p.add_argument("--rebuild", action="store_true", help="rebuild their bodies from the current config")
    p = add("sessions", cmd_sessions, "parking sessions: entry, exit, match, state")
    with_config(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--open", action="store_true", help="sessions whose car has not left")
    which.add_argument("--closed", action="store_true", help="sessions whose exit was sent")
    which.add_argument("--orphans", action="store_true", help="exit reads that match no session")
    p.add_argument("--plate", metavar="P", help="only this plate (as entered or as read at the exit)")
    p.add_argument("--limit", type=int, default=50, metavar="N")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p = add("attach", cmd_attach, "join an orphan exit read to an open session and send its exit")
    with_config(p)
    p.add_argument("exit_id", type=int, metavar="EXIT_ID")
    p.add_argument("out_serial", metavar="OUT_SERIAL")
    p = add("dismiss", cmd_dismiss, "mark an orphan exit read as handled, sending nothing (it is kept)")
    with_config(p)
    p.add_argument("exit_id", type=int, metavar="EXIT_ID")
    p = add("close", cmd_close, "close a session whose car left unseen; its exit is sent flagged manual")
    with_config(p)
    p.add_argument("out_serial", metavar="OUT_SERIAL")
    p.add_argument("--at", metavar="TIME", help="when the car left: Unix seconds or ISO 8601 (default: now)")
    p = add("simulate", cmd_simulate, "publish a plate read in that camera's own format (commissioning)")
    with_config(p)
    p.add_argument("--camera", required=True, metavar="ID")
    p.add_argument("--plate", required=True, metavar="P")
    p.add_argument("--color", metavar="C", help="blue, yellow, green, … or a PLATE_COLOR_* name")
    p.add_argument("--lane", metavar="N")
    p.add_argument(
        "--direction",
        choices=[d.value for d in Direction],
        help="the way the car passed, for a two-way lane (only generic and qianyi cameras report one)",
    )
    p = add("sandbox", cmd_sandbox, "a local stand-in of the WeChat Pay parking API, over HTTPS")
    p.add_argument("--dir", default="./edgeagent-sandbox", metavar="DIR", help="keys, CA and config fragment")
    p.add_argument("--port", type=int, default=8443, metavar="N")
    p = add("demo", cmd_demo, "the whole flow on this machine: broker, sandbox, agent, cameras")
    p.add_argument("--keep", action="store_true", help="keep the demo's temporary directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    except KeyFileError as exc:
        print(f"{resolve_path(getattr(args, 'config', None))}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except JournalError as exc:
        print(f"edgeagent: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except EdgeAgentError as exc:
        print(f"edgeagent: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
