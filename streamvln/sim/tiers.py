"""The task ladder: scene layouts and episode sampling for the easy rungs (`room`, `neighbour`) below `r2r`.

A tier is part of the scene id ("room-train_0003"), so a scene is still a pure function of its id and any
simulator rebuilds it from an episode alone; `r2r` ids carry no prefix and are today's scenes.

- `room`: one room with 2-4 objects, each a box or a ball of a colour no other object has. The start is in
  the same room, at least 2.5 m (geodesic) from the goal, facing anywhere; the instruction names the goal.
- `neighbour`: two rooms joined through one doorway (and a hallway), 1-2 such objects in each; the goal
  is in the other room, and the instruction names that room and the goal.

Both use ObjectNav's 1.0 m success radius, written into each episode's goal.
"""

from __future__ import annotations

import math

import numpy as np

from .navgrid import NavGrid
from .world import (COLOURS, FLOOR_LOOKS, KINDS, POOLS, ROOM_PITCH, TIER_PREFIXES, WALL_LOOKS, Door, Obj, Room,
                    SceneError, SceneSpec, generate_scene, parse_scene_id)

TIERS = {
    "room": "start and goal object in one room, among 2-4 objects of distinct colours (radius 1.0 m)",
    "neighbour": "the goal object is in the room next to the start room, through one doorway (radius 1.0 m)",
    "r2r": "R2R-like paths across scenes of 2-6 rooms (radius 3.0 m)",
}
assert set(TIERS) - {"r2r"} == set(TIER_PREFIXES)
TIER_VERSION = 1
# per tier: success radius (m), least geodesic start-to-goal (m), most (m)
TIER_DEFAULTS = {"room": (1.0, 2.5, 25.0), "neighbour": (1.0, 2.5, 25.0), "r2r": (3.0, 4.0, 25.0)}
ROOM_TEMPLATES = ("Walk to the {goal} and stop next to it.", "Go to the {goal} and stop beside it.",
                  "Find the {goal} and stop next to it.")
NEIGHBOUR_TEMPLATES = ("Go through the doorway into the {room} and stop next to the {goal}.",
                       "Walk into the {room} next door and stop beside the {goal}.",
                       "Leave this room through the doorway and stop next to the {goal} in the {room}.")


def tier_of(scene_id: str) -> str:
    parse_scene_id(scene_id)  # refuses unknown ids, saying what they look like
    prefix = str(scene_id).split("-", 1)[0]
    return prefix if prefix in TIERS and "-" in str(scene_id) else "r2r"


def tier_scene_id(tier: str, plain_id: str) -> str:
    if tier not in TIERS:
        raise SceneError(f"unknown tier {tier!r}; known: {', '.join(TIERS)}")
    return plain_id if tier == "r2r" else f"{tier}-{plain_id}"


def build_scene(scene_id: str) -> SceneSpec:
    """The scene any scene id names, whatever its tier."""
    tier = tier_of(scene_id)
    if tier == "r2r":
        return generate_scene(scene_id)
    pool, index = parse_scene_id(scene_id)
    rng = np.random.default_rng([TIER_VERSION, list(TIERS).index(tier) + 11, POOLS[pool], index])
    spec = _room_scene(rng, scene_id) if tier == "room" else _neighbour_scene(rng, scene_id)
    spec.validate()
    return spec


def _looks(rng, n: int) -> list[tuple[str, str]]:
    walls = rng.permutation(list(WALL_LOOKS))[:n]
    floors = list(FLOOR_LOOKS)
    return [(str(w), floors[int(rng.integers(len(floors)))]) for w in walls]


def _room_scene(rng, scene_id: str) -> SceneSpec:
    (wall, floor), = _looks(rng, 1)
    w, e, n, s = (round(float(v), 1) for v in rng.uniform(2.6, 3.8, size=4))
    room = Room(-w, e, -n, s, wall, floor)
    colours = list(rng.permutation(COLOURS))
    objects = _objects_in(rng, room, 0, int(rng.integers(2, 5)), colours, [])
    return SceneSpec(scene_id, (room,), (), tuple(objects))


def _neighbour_scene(rng, scene_id: str) -> SceneSpec:
    looks = _looks(rng, 2)
    axis = "x" if rng.random() < 0.5 else "z"
    rooms = []
    for k, (wall, floor) in enumerate(looks):
        cx, cz = (k * ROOM_PITCH, 0.0) if axis == "x" else (0.0, k * ROOM_PITCH)
        w, e, n, s = (round(float(v), 1) for v in rng.uniform(2.6, 3.6, size=4))
        rooms.append(Room(cx - w, cx + e, cz - n, cz + s, wall, floor))
    a, b = rooms
    lo, hi = ((max(a.min_z, b.min_z), min(a.max_z, b.max_z)) if axis == "x" else
              (max(a.min_x, b.min_x), min(a.max_x, b.max_x)))
    width = round(float(rng.uniform(1.0, 1.4)), 2)
    start = round(float(rng.uniform(lo + 0.4, hi - 0.4 - width)), 2)
    door = Door(0, 1, axis, start, start + width)
    mouths = [(a.max_x, door.centre_along), (b.min_x, door.centre_along)] if axis == "x" else \
             [(door.centre_along, a.max_z), (door.centre_along, b.min_z)]
    colours = list(rng.permutation(COLOURS))
    objects: list[Obj] = []
    for r, room in enumerate(rooms):
        objects += _objects_in(rng, room, r, int(rng.integers(1, 3)), colours, mouths, objects)
    return SceneSpec(scene_id, tuple(rooms), (door,), tuple(objects))


def _objects_in(rng, room: Room, r: int, count: int, colours: list, mouths, placed=()) -> list[Obj]:
    """`count` boxes or balls, each taking the next unused colour, clear of walls, doorways and each other."""
    out: list[Obj] = []
    for _ in range(count):
        for _try in range(40):
            kind = ("box", "ball")[int(rng.integers(2))]
            rad = KINDS[kind][2]
            x = round(float(rng.uniform(room.min_x + rad + 0.5, room.max_x - rad - 0.5)), 2)
            z = round(float(rng.uniform(room.min_z + rad + 0.5, room.max_z - rad - 0.5)), 2)
            if any(math.hypot(x - mx, z - mz) < 1.6 for mx, mz in mouths):
                continue
            if any(math.hypot(x - o.x, z - o.z) < rad + o.radius + 1.0 for o in [*placed, *out]):
                continue
            out.append(Obj(kind, str(colours.pop(0)), x, z, round(float(rng.uniform(-math.pi, math.pi)), 3), r))
            break
    return out


def sample_tier_paths(spec: SceneSpec, grid: NavGrid, rng, tier: str, min_geodesic: float, max_geodesic: float,
                      goal_point, goals_per_start: int = 1) -> list[dict]:
    """Draws from one start (position and heading): one to a random object, or with goals_per_start > 1 up to
    that many, each to another object. Those episodes' first frames are identical and only the instruction
    tells them apart (training data that can only be fitted by reading it). Empty when the draw does not fit.

    `goal_point(grid, obj, start)` is the episode generator's navigable point beside an object."""
    goal = spec.objects[int(rng.integers(len(spec.objects)))]
    start_room = goal.room if tier == "room" else 1 - goal.room
    room = spec.rooms[start_room]
    x = round(float(rng.uniform(room.min_x + 0.4, room.max_x - 0.4)), 3)
    z = round(float(rng.uniform(room.min_z + 0.4, room.max_z - 0.4)), 3)
    heading = round(float(rng.uniform(-math.pi, math.pi)), 4)
    if not grid.is_navigable(x, z):
        return []
    if goals_per_start == 1:
        draw = _path_to(spec, grid, rng, tier, (x, z), heading, goal, min_geodesic, max_geodesic, goal_point)
        return [draw] if draw else []
    goals = [o for o in spec.objects if (o.room == start_room) == (tier == "room")]
    draws = []
    for k in rng.permutation(len(goals)).tolist():
        draw = _path_to(spec, grid, rng, tier, (x, z), heading, goals[k], min_geodesic, max_geodesic, goal_point)
        if draw:
            draws.append(draw)
    return draws[:goals_per_start] if len(draws) >= 2 else []


def _path_to(spec, grid, rng, tier, start, heading, goal, min_geodesic, max_geodesic, goal_point) -> dict | None:
    x, z = start
    goal_xz = goal_point(grid, goal, (x, z))
    if goal_xz is None:
        return None
    path = grid.path((x, z), goal_xz)
    if path is None:
        return None
    length = sum(math.dist(p, q) for p, q in zip(path, path[1:]))
    if not min_geodesic <= length <= max_geodesic:
        return None
    templates = ROOM_TEMPLATES if tier == "room" else NEIGHBOUR_TEMPLATES
    text = templates[int(rng.integers(len(templates)))].format(goal=goal.name, room=spec.rooms[goal.room].name)
    return {"start": (x, z), "heading": heading, "goal": goal, "goal_xz": goal_xz, "path": path, "length": length,
            "instruction": text}
