"""The simulator interface every navigation backend implements (MiniWorld here; Habitat could be ~100 lines).

Conventions follow Habitat so that episodes and poses carry over: positions are [x, y, z] metres
with y up (y = 0 on the floor here), headings are yaw about +y in radians with 0 facing -z, and
episode rotations are quaternions [x, y, z, w]. Actions are Habitat's VLN-CE ids.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

STOP, FORWARD, LEFT, RIGHT = 0, 1, 2, 3
ACTION_NAMES = {STOP: "STOP", FORWARD: "FORWARD", LEFT: "LEFT", RIGHT: "RIGHT"}


@dataclass
class SimConfig:
    """Defaults are the reference's Habitat task (config/vln_r2r.yaml): 640x480, hfov 79, camera 1.25 m."""

    width: int = 640
    height: int = 480
    hfov: float = 79.0
    camera_height: float = 1.25
    forward_step: float = 0.25
    turn_angle: float = 15.0
    max_steps: int = 500
    agent_radius: float = 0.18
    # None: each episode's goal radius (R2R's 3.0 m, ObjectNav's 1.0 m on the easier tiers), 3.0 m where a goal
    # has none; a number overrides every episode's, as Habitat's SUCCESS_DISTANCE does
    success_distance: float | None = None
    grid_resolution: float = 0.05
    grid_margin: float = 0.05  # planning clearance on top of the agent radius

    def validate(self):
        if self.width < 8 or self.height < 8:
            raise ValueError(f"image size {self.width}x{self.height} is too small")
        if not 1.0 <= self.hfov < 180.0:
            raise ValueError(f"hfov must be in [1, 180), got {self.hfov}")
        for name in ("forward_step", "turn_angle", "agent_radius", "success_distance", "grid_resolution"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_steps < 1:
            raise ValueError("max_steps must be at least 1")


def success_distance(config: SimConfig, episode) -> float:
    """The distance within which STOP succeeds: the config's if set, else the episode goal's radius, else 3.0."""
    if config.success_distance is not None:
        return float(config.success_distance)
    radius = episode.goals[0].get("radius") if episode.goals else None
    return 3.0 if radius is None else float(radius)


@dataclass
class Observation:
    rgb: np.ndarray  # uint8 (H, W, 3)
    position: np.ndarray  # [x, y, z]
    heading: float  # yaw about +y, 0 facing -z
    step: int  # actions taken so far in this episode
    collided: bool = False  # the action just taken was a forward step into an obstacle
    info: dict = field(default_factory=dict)


class SimulatorError(ValueError):
    """An episode the simulator cannot run: unknown scene, start in an obstacle, goal off the navigable space.

    `kind` is a short fixed reason for counting rejects; the message says which episode and where.
    """

    def __init__(self, message: str, kind: str = "simulator error"):
        super().__init__(message)
        self.kind = kind


def heading_to_quaternion(heading: float) -> list[float]:
    return [0.0, math.sin(heading / 2), 0.0, math.cos(heading / 2)]


def quaternion_to_heading(q) -> float:
    """Yaw about +y of a quaternion [x, y, z, w] (the y-rotation part; tilt is ignored)."""
    x, y, z, w = (float(v) for v in q)
    return math.atan2(2.0 * (w * y + x * z), 1.0 - 2.0 * (y * y + x * x))


def wrap(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


def ground_pose(sim) -> tuple[float, float, float]:
    """The agent's (x, z, heading) on the floor plan: what a view's geometry needs (streamvln.sim.views)."""
    position, heading = sim.agent_pose()
    return float(position[0]), float(position[2]), float(heading)


def bearing(src, dst) -> float:
    """Heading (Habitat convention) that faces from src to dst, both [x, z]."""
    return math.atan2(-(dst[0] - src[0]), -(dst[1] - src[1]))


class NavSimulator(ABC):
    """reset pins an episode; step executes one VLN action; the episode ends on STOP or the step limit."""

    config: SimConfig

    @abstractmethod
    def reset(self, episode) -> Observation: ...

    @abstractmethod
    def step(self, action: int) -> Observation: ...

    @property
    @abstractmethod
    def done(self) -> bool: ...

    @abstractmethod
    def metrics(self) -> dict: ...

    @abstractmethod
    def agent_pose(self) -> tuple[np.ndarray, float]: ...

    @abstractmethod
    def teleport(self, position, heading: float) -> Observation: ...

    @abstractmethod
    def geodesic(self, a, b) -> float: ...

    @abstractmethod
    def expert_action(self, goal, radius: float) -> int: ...

    def close(self) -> None:  # noqa: B027 (optional)
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
