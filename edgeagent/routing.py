"""Routing: which configured camera a topic belongs to, and which entrance or exit a camera's lane feeds.

Compiled once from the config (SPEC §3 `[[cameras]]`, `[[entrances]]`, `[[exits]]`). A source
`"camera:lane"` names one lane and wins over a plain `"camera"`, which covers every lane of it.
The config guarantees that a lane reaches both an entrance and an exit only through the same source
listed under both (a two-way lane, SPEC §10); there the read's own direction decides.
Pure code: MQTT topic-filter matching is done here rather than through paho.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

from edgeagent.config import CameraConfig, Config, EntranceConfig, ExitConfig
from edgeagent.model import Direction, Reason

G = TypeVar("G", EntranceConfig, ExitConfig)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 §4.7 matching of `topic` against a filter with `+` and `#` wildcards."""
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    # Wildcards never match topics starting with "$" (broker-internal, e.g. $SYS).
    if topic.startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for i, level in enumerate(filter_levels):
        if level == "#":
            return True
        if i >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[i]:
            return False
    return len(filter_levels) == len(topic_levels)


def _index(gates: tuple[G, ...]) -> tuple[dict[tuple[str, str], G], dict[str, G]]:
    """(camera, lane) → gate and camera → gate, from the gates' sources."""
    by_lane: dict[tuple[str, str], G] = {}
    by_camera: dict[str, G] = {}
    for gate in gates:
        for source in gate.sources:
            camera, _, lane = source.partition(":")
            if lane:
                by_lane[(camera, lane)] = gate
            else:
                by_camera[camera] = gate
    return by_lane, by_camera


def _lookup(by_lane: dict[tuple[str, str], G], by_camera: dict[str, G], camera_id: str, lane: str | None) -> G | None:
    if lane is not None and (gate := by_lane.get((camera_id, lane))) is not None:
        return gate
    return by_camera.get(camera_id)


@dataclass(frozen=True, slots=True)
class Router:
    """Topic → camera and (camera, lane[, direction]) → entrance or exit lookups, built by `Router.build`."""

    cameras: tuple[CameraConfig, ...]
    by_lane: dict[tuple[str, str], EntranceConfig]
    by_camera: dict[str, EntranceConfig]
    exit_by_lane: dict[tuple[str, str], ExitConfig] = field(default_factory=dict)
    exit_by_camera: dict[str, ExitConfig] = field(default_factory=dict)

    @classmethod
    def build(cls, config: Config) -> Router:
        by_lane, by_camera = _index(config.entrances)
        exit_by_lane, exit_by_camera = _index(config.exits)
        return cls(config.cameras, by_lane, by_camera, exit_by_lane, exit_by_camera)

    def camera_for(self, topic: str) -> CameraConfig | None:
        """The first camera (in config order) whose topic filter matches `topic`."""
        return next((c for c in self.cameras if topic_matches(c.topic, topic)), None)

    def entrance_for(self, camera_id: str, lane: str | None) -> EntranceConfig | None:
        """The entrance fed by this camera's lane; a lane-specific source wins over the whole camera.

        Blind to exits and directions: kept for the entry-only pipeline; `route` is the full rule.
        """
        return _lookup(self.by_lane, self.by_camera, camera_id, lane)

    def exit_for(self, camera_id: str, lane: str | None) -> ExitConfig | None:
        """The exit fed by this camera's lane; a lane-specific source wins over the whole camera."""
        return _lookup(self.exit_by_lane, self.exit_by_camera, camera_id, lane)

    def route(
        self, camera_id: str, lane: str | None, direction: Direction | None
    ) -> EntranceConfig | ExitConfig | Reason:
        """Where a read of this camera's lane goes (SPEC §10), or why nowhere.

        A one-way lane goes to its entrance or exit whatever the read says: the config is the lane's
        role, and a camera's direction field may be set up for another lane (Qianyi's `inout` is a
        camera setting, anpr-formats.md §3.3). A two-way lane goes by the read's direction; without
        one it is `Reason.NO_DIRECTION`, never guessed. No source at all: `Reason.UNMAPPED_LANE`.
        """
        entrance = self.entrance_for(camera_id, lane)
        exit_ = self.exit_for(camera_id, lane)
        if entrance is not None and exit_ is not None:
            if direction is None:
                return Reason.NO_DIRECTION
            return entrance if direction is Direction.IN else exit_
        return entrance or exit_ or Reason.UNMAPPED_LANE
