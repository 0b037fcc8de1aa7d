"""VLN metrics as VLN-CE / habitat-lab define them: distance to goal, success, SPL, oracle success, nDTW, SDTW.

`EpisodeMeasures` is updated after reset and after every step, as habitat's measures are; the pure
functions below it are what it uses and what tests check against numbers worked out by hand.
"""

from __future__ import annotations

import math

import numpy as np


def path_length(points) -> float:
    """Sum of Euclidean (3D) distances between consecutive positions (habitat's SPL path length)."""
    p = np.asarray(points, np.float64)
    return float(np.linalg.norm(np.diff(p, axis=0), axis=1).sum()) if len(p) > 1 else 0.0


def spl(success: float, d0: float, length: float) -> float:
    """success * d0 / max(d0, length)."""
    if not success:
        return 0.0
    return float(d0 / max(d0, length)) if max(d0, length) > 0 else 1.0


def dtw(path, reference) -> float:
    """Dynamic time warping distance with Euclidean point costs (VLN-CE's nDTW measure)."""
    a, b = np.asarray(path, np.float64), np.asarray(reference, np.float64)
    cost = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)
    acc = np.full((len(a) + 1, len(b) + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, len(a) + 1):
        row, prev = acc[i], acc[i - 1]
        for j in range(1, len(b) + 1):
            row[j] = cost[i - 1, j - 1] + min(prev[j], row[j - 1], prev[j - 1])
    return float(acc[-1, -1])


def ndtw(path, reference, success_distance: float = 3.0) -> float:
    """exp(-DTW(path, reference) / (len(reference) * success_distance))."""
    return float(math.exp(-dtw(path, reference) / (len(reference) * success_distance)))


def densify(points, spacing: float) -> np.ndarray:
    """A polyline resampled every `spacing` metres along its length (both ends kept)."""
    p = np.asarray(points, np.float64)
    if len(p) < 2:
        return p.copy()
    seg = np.linalg.norm(np.diff(p, axis=0), axis=1)
    s = np.r_[0.0, np.cumsum(seg)]
    n = max(int(math.ceil(s[-1] / spacing)), 1)
    t = np.linspace(0.0, s[-1], n + 1)
    return np.stack([np.interp(t, s, p[:, k]) for k in range(p.shape[1])], axis=1)


class EpisodeMeasures:
    """Per-episode accumulation of every measure; `distance_fn(position) -> geodesic metres to the goal`."""

    def __init__(self, distance_fn, start_position, reference_path, success_distance: float = 3.0,
                 dtw_spacing: float = 0.25):
        self.distance_fn = distance_fn
        self.success_distance = success_distance
        # The reference resampled at the step length: VLN-CE compares against the expert's per-step
        # locations, which a sparse waypoint list would penalise even for a perfect agent.
        self.reference = densify(reference_path, dtw_spacing)
        start = np.asarray(start_position, np.float64)
        self.positions = [start]
        self.d0 = float(distance_fn(start))
        self.distance = self.d0
        self.min_distance = self.d0
        self.oracle_success = float(self.d0 < success_distance)
        self.steps = 0
        self.collisions = 0
        self.stop_called = False

    def update(self, position, action: int, collided: bool) -> None:
        pos = np.asarray(position, np.float64)
        self.steps += 1
        self.collisions += int(collided)
        if action == 0:
            self.stop_called = True
        # habitat recomputes the distance only when the agent moved (> 1e-4)
        if np.linalg.norm(pos - self.positions[-1]) > 1e-4:
            self.distance = float(self.distance_fn(pos))
            self.positions.append(pos)
        self.min_distance = min(self.min_distance, self.distance)
        self.oracle_success = float(self.oracle_success or self.distance < self.success_distance)

    def result(self) -> dict:
        success = float(self.stop_called and self.distance < self.success_distance)
        length = path_length(self.positions)
        n = ndtw(self.positions, self.reference, self.success_distance)
        return {
            "distance_to_goal": self.distance,
            "success": success,
            "spl": spl(success, self.d0, length),
            "oracle_success": self.oracle_success,
            "navigation_error": self.distance,
            "oracle_navigation_error": self.min_distance,
            "ndtw": n,
            "sdtw": success * n,
            "path_length": length,
            "steps": self.steps,
            "collisions": self.collisions,
            "geodesic_start": self.d0,
            "stopped": float(self.stop_called),
            "success_distance": self.success_distance,
        }
