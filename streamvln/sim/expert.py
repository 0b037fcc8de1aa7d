"""The geodesic expert: Habitat's ShortestPathFollower semantics over the navigable grid.

STOP once the geodesic distance to the goal is within the radius (or when no path exists, as
Habitat's follower answers a follower error). FORWARD when the next corner of the shortest path
lies within three quarters of a turn of straight ahead and the step is free: with half a turn
(the tightest tolerance a 15-degree lattice allows) the bearing to a corner that lies between two
lattice headings drifts across the threshold every step or two, and the expert zigzags
(left, forward, right, forward) along every diagonal. Otherwise the expert looks at the
headings it can reach by turning (every multiple of the turn angle), keeps those whose forward
step is free of collisions, and turns toward the one whose step ends nearest that corner. That
choice depends on the position only, not on the current heading, so the expert never turns back
and forth; and since MiniWorld does not slide along walls the way Habitat does, checking the step
itself keeps it off door jambs that a pure aim-then-walk rule would graze.
"""

from __future__ import annotations

import math

import numpy as np

from .base import FORWARD, LEFT, RIGHT, STOP, bearing, wrap
from .navgrid import NavGrid


def next_action(grid: NavGrid, position, heading: float, goal, radius: float, forward_step: float = 0.25,
                turn_angle: float = 15.0) -> int:
    """position/goal are [x, y, z] (or [x, z]); heading in Habitat's convention."""
    here, there = _xz(position), _xz(goal)
    path = grid.path(here, there)
    if path is None:
        return STOP
    length = sum(math.dist(p, q) for p, q in zip(path, path[1:]))
    if length <= radius:
        return STOP
    # aim past corners closer than a step: stepping onto them is no progress
    target = next((p for p in path[1:] if math.dist(p, here) > forward_step * 0.5), path[-1])
    delta = wrap(bearing(here, target) - heading)
    ahead = (here[0] - forward_step * math.sin(heading), here[1] - forward_step * math.cos(heading))
    if abs(delta) <= math.radians(turn_angle) * 0.75 and not grid.collides(*ahead):
        return FORWARD
    turns = int(round(360.0 / turn_angle))
    # fewest turns first, left before right: ties go to the cheaper, then the left, turn
    ks = np.array(sorted(range(-(turns // 2) + 1, turns // 2 + 1), key=lambda k: (abs(k), -k)))
    h = heading + math.radians(turn_angle) * ks
    sx, sz = here[0] - forward_step * np.sin(h), here[1] - forward_step * np.cos(h)
    free = grid.clearance(sx, sz) >= grid.radius
    if not free.any():  # boxed in: turning is all that is left
        return LEFT
    score = np.hypot(sx - target[0], sz - target[1])
    score[~free] = np.inf
    k = int(ks[int(np.argmin(score))])  # argmin keeps the first of equal scores
    return FORWARD if k == 0 else LEFT if k > 0 else RIGHT


def _xz(p) -> tuple[float, float]:
    return (float(p[0]), float(p[2])) if len(p) == 3 else (float(p[0]), float(p[1]))
