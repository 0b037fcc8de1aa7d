"""Expert intervention during RL rollouts: off-track detection, the inline recovery expert, the goal zone.

All geometry is in the x-z plane (y is up), as the guide's (grpo-sft-hybrid.md section 2), with its
bugs fixed: the recovery expert is really entered (B3), the expert's labels never say STOP before
the final goal (B7), and every way an intervention ends an episode is a failure with a terminal
reward (B9; rewards.py). One `Intervention` per running episode; per step, before the action:

1. `observe(position, heading, d_geo)` updates the path bookkeeping, the goal zone and the
   off-track counter, starts or ends a recovery, and returns who acts: "policy", "expert", or
   "end" (the recovery ran out of steps).
2. `expert_label(sim)` is the expert's action in this state (toward the look-ahead waypoint with a
   small radius, STOP only within oracle_goal_radius of the goal): what an expert-driven step
   executes, and the SFT label of a policy step.
3. `review(action, d_geo)` judges the policy's action: "execute", "force_stop" (lingering in the
   goal zone past grace and patience: the expert's STOP is executed instead) or "premature_stop"
   (a STOP farther than goal_radius from the goal: not executed, the episode ends as a failure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from streamvln.sim.base import STOP

from .config import RLConfig


def _xz(p) -> np.ndarray:
    return np.array([float(p[0]), float(p[2])]) if len(p) == 3 else np.array([float(p[0]), float(p[1])])


def segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    t = 0.0 if not ab.any() else float(np.clip(np.dot(p - a, ab) / np.dot(ab, ab), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * ab)))


@dataclass
class Geometry:
    nearest: int  # index of the nearest reference-path point
    distance: float  # to the path (the segments around the nearest point)
    target: np.ndarray  # look-ahead point [x, z]
    target_is_goal: bool
    heading_error: float  # degrees between facing and the direction to the target, in [0, 180]


class Intervention:
    def __init__(self, cfg: RLConfig, episode):
        self.cfg = cfg
        self.points = [_xz(p) for p in episode.reference_path]
        self.goal = _xz(episode.goals[0]["position"])
        self.last_progress = 0
        self.offtrack = 0  # consecutive off-track steps
        self.in_recovery = False
        self.recovery_steps = 0
        self.in_zone = 0  # consecutive steps within goal_radius
        self.after_grace = 0
        self.recoveries = 0  # interventions started in this episode
        self.geometry: Geometry | None = None

    def measure(self, position, heading: float) -> Geometry:
        """Nearest path point, distance to the path, look-ahead target and heading error (section 2.1)."""
        p = _xz(position)
        pts = self.points or [self.goal]
        d = [float(np.linalg.norm(p - q)) for q in pts]
        nearest = int(np.argmin(d))
        segs = [segment_distance(p, pts[j], pts[j + 1]) for j in (nearest - 1, nearest) if 0 <= j < len(pts) - 1]
        distance = min(segs + [d[nearest]])
        self.last_progress = max(self.last_progress, nearest)
        t = min(max(nearest, self.last_progress) + self.cfg.lookahead_k, len(pts) - 1)
        at_goal = t >= len(pts) - 1
        target = self.goal if at_goal else pts[t]
        facing = np.array([-math.sin(heading), -math.cos(heading)])
        to = target - p
        norm = float(np.linalg.norm(to))
        err = 0.0 if norm < 1e-9 else math.degrees(math.acos(float(np.clip(np.dot(facing, to / norm), -1, 1))))
        return Geometry(nearest, distance, target, at_goal, err)

    def observe(self, position, heading: float, d_geo: float) -> str:
        cfg, g = self.cfg, self.measure(position, heading)
        self.geometry = g
        if d_geo <= cfg.goal_radius:  # goal zone: no off-track bookkeeping, a recovery ends
            self.in_zone += 1
            self.after_grace = 0 if self.in_zone <= cfg.goal_grace_steps else self.after_grace + 1
            self.offtrack, self.in_recovery = 0, False
            return "policy"
        self.in_zone = self.after_grace = 0
        if not cfg.enable_recovery:
            return "policy"
        if self.in_recovery:
            self.recovery_steps += 1
            if g.distance < cfg.recovery_dist_thresh and g.heading_error < cfg.recovery_heading_thresh_deg:
                self.in_recovery = False  # back on track, facing along it: the policy again
                return "policy"
            return "end" if self.recovery_steps > cfg.recovery_max_steps else "expert"
        off = g.distance > cfg.offtrack_dist_thresh or (
            g.heading_error > cfg.offtrack_heading_thresh_deg and g.distance > cfg.heading_guard_dist)
        self.offtrack = self.offtrack + 1 if off else 0
        if self.offtrack >= cfg.offtrack_patience:
            self.in_recovery, self.recovery_steps, self.offtrack = True, 1, 0
            self.recoveries += 1
            return "expert"
        return "policy"

    def expert_label(self, sim) -> int:
        """The expert's action here: toward the look-ahead waypoint (small radius; a reached waypoint
        passes on to the next), STOP only within oracle_goal_radius of the goal (B7)."""
        g = self.geometry
        pts = self.points or [self.goal]
        t = min(max(g.nearest, self.last_progress) + self.cfg.lookahead_k, len(pts) - 1)
        while t < len(pts) - 1:
            waypoint = pts[t]
            action = sim.expert_action([waypoint[0], 0.0, waypoint[1]], self.cfg.waypoint_radius)
            if action != STOP:
                return action
            t += 1
        return sim.expert_action([self.goal[0], 0.0, self.goal[1]], self.cfg.oracle_goal_radius)

    def review(self, action: int, d_geo: float) -> str:
        cfg = self.cfg
        if not cfg.enable_recovery:  # no intervention of any kind: plain GRPO (+ SFT on labels)
            return "execute"
        if action == STOP and d_geo > cfg.goal_radius:
            return "premature_stop"
        if (action != STOP and cfg.goal_stop_patience > 0 and self.in_zone > cfg.goal_grace_steps
                and self.after_grace >= cfg.goal_stop_patience):
            return "force_stop"
        return "execute"
