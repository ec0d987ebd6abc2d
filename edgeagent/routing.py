"""Routing: which configured camera a topic belongs to, and which entrance a camera's lane feeds.

Compiled once from the config (SPEC §3 `[[cameras]]` and `[[entrances]]`). A source
`"camera:lane"` names one lane and wins over a plain `"camera"`, which covers every lane of it.
Pure code: MQTT topic-filter matching is done here rather than through paho.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeagent.config import CameraConfig, Config, EntranceConfig


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


@dataclass(frozen=True, slots=True)
class Router:
    """Topic → camera and (camera, lane) → entrance lookups, built by `Router.build`."""

    cameras: tuple[CameraConfig, ...]
    by_lane: dict[tuple[str, str], EntranceConfig]
    by_camera: dict[str, EntranceConfig]

    @classmethod
    def build(cls, config: Config) -> Router:
        by_lane: dict[tuple[str, str], EntranceConfig] = {}
        by_camera: dict[str, EntranceConfig] = {}
        for entrance in config.entrances:
            for source in entrance.sources:
                camera, _, lane = source.partition(":")
                if lane:
                    by_lane[(camera, lane)] = entrance
                else:
                    by_camera[camera] = entrance
        return cls(config.cameras, by_lane, by_camera)

    def camera_for(self, topic: str) -> CameraConfig | None:
        """The first camera (in config order) whose topic filter matches `topic`."""
        return next((c for c in self.cameras if topic_matches(c.topic, topic)), None)

    def entrance_for(self, camera_id: str, lane: str | None) -> EntranceConfig | None:
        """The entrance fed by this camera's lane; a lane-specific source wins over the whole camera."""
        if lane is not None and (entrance := self.by_lane.get((camera_id, lane))) is not None:
            return entrance
        return self.by_camera.get(camera_id)
