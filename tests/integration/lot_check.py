"""The outside check of issue 10: what WeChat's side saw, judged from the sandbox's logs alone.

Given what the cameras published (plates read at an entrance, plates read at an exit after they
entered, plates read at an exit that never entered), `outside_check` asserts SPEC §1 guarantee 4 and
§10 on `sandbox.accepted()`, `sandbox.exits()` and `sandbox.requests()`, without looking at the journal:

- every exit request (whatever its answer) reached the API after its entry was accepted (a 200 in the
  request log, earlier in the log and earlier in time), and no exit request was refused;
- every accepted exit is under an accepted entry's number, with that entry's plate, colour and
  parking_id, not before it; a number has one exit (re-sends of the same exit are counted, not refused);
- every entry once: one number per car; no entry and no exit for a plate no camera read;
- no exit for a car that never left or never entered; with `complete`, every car read entering was
  accepted and every car read leaving has its exit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from edgeagent.sandbox import Sandbox
from edgeagent.sandbox.api import MAX_REQUESTS_KEPT

ENTRY_PATH = "/v3/parking/reminders/entry"
EXIT_PATH = "/v3/parking/reminders/exit"


@dataclass(frozen=True, slots=True)
class LotReport:
    entries: int  # accepted entries
    exits: int  # accepted exits
    entry_resends: int  # repeated entry requests answered idempotently (after a kill, a timeout)
    exit_resends: int  # the same for exits
    exit_requests: int  # every exit request seen, accepted or not


def outside_check(
    sandbox: Sandbox,
    *,
    entered: Collection[str],
    left: Collection[str],
    never_entered: Collection[str] = (),
    complete: bool = True,
) -> LotReport:
    """Assert the lot's invariants from the sandbox's logs (see the module docstring); returns the counts.

    `entered`: plates read at an entrance (one stay each); `left`: those of them read at an exit (as the
    entry has them: no fuzzy reads here); `never_entered`: plates read only at an exit.
    """
    log = sandbox.requests()
    assert len(log) < MAX_REQUESTS_KEPT, "the sandbox's request log wrapped: the order check would be blind"
    accepted = sandbox.accepted()
    exits = sandbox.exits()
    entries = {e["out_serial_number"]: e for e in accepted}

    # Order: an exit request only after its entry's 200, by log position and by arrival time.
    accepted_at: dict[str, tuple[int, float]] = {}
    exit_requests = 0
    for position, request in enumerate(log):
        serial = request["out_serial_number"]
        if serial is None and request["status"] != 200 and request["status"] != 204:
            # A body the sandbox could not read (a kill -9 cut the request short): refused, carries no
            # number, changed nothing at the API; not an exit or entry of any car.
            continue
        if request["path"] == ENTRY_PATH and request["status"] == 200:
            accepted_at.setdefault(serial, (position, request["at"]))
        elif request["path"] == EXIT_PATH:
            exit_requests += 1
            assert serial in accepted_at, f"exit request for {serial} before its entry was accepted: {request}"
            assert request["at"] >= accepted_at[serial][1], f"exit for {serial} arrived before its entry"
            assert request["status"] in (204, None) or request["status"] >= 500, (
                f"exit request refused (SPEC §10: exits are only sent when they are valid): {request}"
            )

    # Every accepted exit under an accepted entry's number, plate, colour and parking_id, not before it.
    for exit_ in exits:
        entry = entries.get(exit_["out_serial_number"])
        assert entry is not None, f"exit under a number with no accepted entry: {exit_}"
        fields = ("plate_number", "plate_color", "parking_id")
        assert {k: exit_[k] for k in fields} == {k: entry[k] for k in fields}, (exit_, entry)
        assert exit_["exit_timestamp"] >= entry["enter_timestamp"], (exit_, entry)
    serials = Counter(e["out_serial_number"] for e in exits)
    assert not [s for s, n in serials.items() if n > 1], "a number with two exits"

    # Every entry once; nothing for a plate no camera read, nothing for a car that never entered.
    entry_plates = Counter(e["plate_number"] for e in accepted)
    twice = sorted(p for p, n in entry_plates.items() if n > 1)
    assert not twice, f"plates accepted under two numbers: {twice[:10]}"
    unknown = sorted(set(entry_plates) - set(entered))
    assert not unknown, f"entries no camera read: {unknown[:10]}"
    exit_plates = Counter(e["plate_number"] for e in exits)
    strangers = sorted(set(exit_plates) & set(never_entered))
    assert not strangers, f"exits for cars never seen entering: {strangers[:10]}"
    not_left = sorted(set(exit_plates) - set(left))
    assert not not_left, f"exits for cars never read leaving: {not_left[:10]}"
    assert not set(entry_plates) & set(never_entered), "an entry for a car only read leaving"
    if complete:
        missing = sorted(set(entered) - set(entry_plates))
        assert not missing, f"{len(missing)} entries never accepted: {missing[:10]}"
        unsent = sorted(set(left) - set(exit_plates))
        assert not unsent, f"{len(unsent)} exits never accepted: {unsent[:10]}"
    return LotReport(
        entries=len(accepted),
        exits=len(exits),
        entry_resends=sum(int(e["repeats"]) for e in accepted),
        exit_resends=sum(int(e["repeats"]) for e in exits),
        exit_requests=exit_requests,
    )


def progress(sandbox: Sandbox, entered: Collection[str], left: Collection[str]) -> dict[str, Any]:
    """How far delivery got: entries and exits still missing (for `eventually` messages)."""
    have_in = {e["plate_number"] for e in sandbox.accepted()}
    have_out = {e["plate_number"] for e in sandbox.exits()}
    return {"entries_missing": len(set(entered) - have_in), "exits_missing": len(set(left) - have_out)}
