"""Procedural scenes: seeded room layouts, doorways, hallways and objects as pure geometry (no GL).

A scene is a `SceneSpec`: axis-aligned rooms on a lattice, each with its own wall and floor texture,
connected through doorways by hallways, with named objects in them. The MiniWorld environment is
built from the spec, and so are the walls the navigable grid is computed from, so episode
generation needs no renderer. Scene ids name a pool and an index ("train_0003", "unseen_0007"):
the pools draw their seeds from disjoint ranges, so train and val_unseen never share a scene.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

GENERATOR_VERSION = 1
WALL_HEIGHT = 2.74
DOOR_HEIGHT = 2.2
ROOM_PITCH = 8.5  # lattice spacing of room centres (m)
POOLS = {"train": 1, "unseen": 2, "test": 3}  # train and val_seen share "train"; val_unseen uses "unseen"
TIER_PREFIXES = ("room", "neighbour")  # the easier rungs' scene id prefixes (tiers.py); r2r ids have none
SPLIT_POOLS = {"train": "train", "val_seen": "train", "val_unseen": "unseen", "test": "test"}

# Wall textures and the word instructions use for a room with them (unique within a scene).
WALL_LOOKS = {
    "brick_wall": "brick",
    "wood_planks": "wooden",
    "marble": "marble",
    "stucco": "stucco",
    "concrete": "concrete",
    "cinder_blocks": "cinder-block",
    "rock": "stone",
    "drywall": "white",
}
FLOOR_LOOKS = {"floor_tiles_bw": "tiled", "wood": "parquet", "concrete_tiles": "grey-tiled", "asphalt": "dark",
               "grass": "grassy", "white": "white"}
COLOURS = ("red", "green", "blue", "purple", "yellow", "grey")
# Object kinds: MiniWorld entity, size (box edge / mesh height, m), collision radius as MiniWorld
# computes it for that size (a test checks these against MiniWorld's own entities), and the noun.
KINDS = {
    "box": ("box", 0.7, 0.7 * math.sqrt(2) / 2, "box"),
    "ball": ("ball", 0.6, 0.42512354, "ball"),
    "chair": ("office_chair", 1.0, 0.42272946, "office chair"),
    "desk": ("office_desk", 0.9, 0.5273275, "desk"),
    "barrel": ("barrel", 1.0, 0.48950773, "barrel"),
    "cone": ("cone", 0.75, 0.3364729, "traffic cone"),
    "duck": ("duckie", 0.5, 0.33505166, "rubber duck"),
}
COLOURED = ("box", "ball")


class SceneError(ValueError):
    """An unknown or malformed scene id, or a spec that is not a valid scene."""


@dataclass(frozen=True)
class Room:
    min_x: float
    max_x: float
    min_z: float
    max_z: float
    wall_tex: str = "concrete"
    floor_tex: str = "floor_tiles_bw"

    @property
    def look(self) -> str:
        return WALL_LOOKS.get(self.wall_tex, self.wall_tex)

    @property
    def name(self) -> str:
        return f"{self.look} room"

    @property
    def centre(self) -> tuple[float, float]:
        return (self.min_x + self.max_x) / 2, (self.min_z + self.max_z) / 2

    def contains(self, x, z, inset: float = 0.0):
        return (x > self.min_x + inset) & (x < self.max_x - inset) & (z > self.min_z + inset) & (z < self.max_z - inset)


@dataclass(frozen=True)
class Door:
    """A connection from room `a` to room `b` (b east of a for axis "x", south of a for axis "z").

    `lo`..`hi` is the opening along the shared side (z for axis "x", x for axis "z"); a hallway
    spans the gap between the two walls.
    """

    a: int
    b: int
    axis: str
    lo: float
    hi: float

    @property
    def centre_along(self) -> float:
        return (self.lo + self.hi) / 2


@dataclass(frozen=True)
class Obj:
    kind: str
    colour: str | None
    x: float
    z: float
    yaw: float
    room: int

    @property
    def radius(self) -> float:
        return KINDS[self.kind][2]

    @property
    def name(self) -> str:
        noun = KINDS[self.kind][3]
        return f"{self.colour} {noun}" if self.colour else noun


@dataclass(frozen=True)
class SceneSpec:
    scene_id: str
    rooms: tuple[Room, ...]
    doors: tuple[Door, ...]
    objects: tuple[Obj, ...]

    def hallway(self, door: Door) -> Room:
        """The hallway rectangle of a door (zero length when the rooms touch)."""
        a, b = self.rooms[door.a], self.rooms[door.b]
        if door.axis == "x":
            return Room(a.max_x, b.min_x, door.lo, door.hi, a.wall_tex, a.floor_tex)
        return Room(door.lo, door.hi, a.max_z, b.min_z, a.wall_tex, a.floor_tex)

    @property
    def areas(self) -> list[Room]:
        """Every walkable rectangle: the rooms, then one hallway per door."""
        return list(self.rooms) + [self.hallway(d) for d in self.doors]

    def room_at(self, x: float, z: float) -> int | None:
        """Index of the room containing (x, z), -1 inside a hallway, None outside everything."""
        for i, room in enumerate(self.rooms):
            if room.contains(x, z):
                return i
        for door in self.doors:
            h = self.hallway(door)
            if h.min_x <= x <= h.max_x and h.min_z <= z <= h.max_z:
                return -1
        return None

    def bounds(self) -> tuple[float, float, float, float]:
        return (min(r.min_x for r in self.rooms), max(r.max_x for r in self.rooms),
                min(r.min_z for r in self.rooms), max(r.max_z for r in self.rooms))

    def walls(self) -> np.ndarray:
        """Collidable wall segments (N, 4) as x0, z0, x1, z1: room sides less their doorways, hallway sides."""
        openings: dict[tuple[int, str], list[tuple[float, float]]] = {}
        for d in self.doors:
            side_a, side_b = ("east", "west") if d.axis == "x" else ("south", "north")
            openings.setdefault((d.a, side_a), []).append((d.lo, d.hi))
            openings.setdefault((d.b, side_b), []).append((d.lo, d.hi))
        segs = []
        for i, r in enumerate(self.rooms):
            sides = {"north": ("x", r.min_z, r.min_x, r.max_x), "south": ("x", r.max_z, r.min_x, r.max_x),
                     "west": ("z", r.min_x, r.min_z, r.max_z), "east": ("z", r.max_x, r.min_z, r.max_z)}
            for side, (along, fixed, lo, hi) in sides.items():
                start = lo
                for o_lo, o_hi in sorted(openings.get((i, side), [])):
                    segs.append(_seg(along, fixed, start, o_lo))
                    start = o_hi
                segs.append(_seg(along, fixed, start, hi))
        for d in self.doors:
            h = self.hallway(d)
            if d.axis == "x" and h.max_x > h.min_x:
                segs += [_seg("x", d.lo, h.min_x, h.max_x), _seg("x", d.hi, h.min_x, h.max_x)]
            elif d.axis == "z" and h.max_z > h.min_z:
                segs += [_seg("z", d.lo, h.min_z, h.max_z), _seg("z", d.hi, h.min_z, h.max_z)]
        segs = [s for s in segs if abs(s[2] - s[0]) + abs(s[3] - s[1]) > 1e-9]
        return np.array(segs, np.float64).reshape(-1, 4)

    def validate(self) -> None:
        for d in self.doors:
            a, b = self.rooms[d.a], self.rooms[d.b]
            if d.axis == "x":
                ok = a.max_x <= b.min_x and max(a.min_z, b.min_z) <= d.lo < d.hi <= min(a.max_z, b.max_z)
            elif d.axis == "z":
                ok = a.max_z <= b.min_z and max(a.min_x, b.min_x) <= d.lo < d.hi <= min(a.max_x, b.max_x)
            else:
                ok = False
            if not ok:
                raise SceneError(f"{self.scene_id}: door {d} does not join facing walls of rooms {d.a} and {d.b}")
        names = [o.name for o in self.objects]
        if len(set(names)) != len(names):
            raise SceneError(f"{self.scene_id}: object names must be unique in a scene, got {names}")


def _seg(along: str, fixed: float, lo: float, hi: float) -> tuple[float, float, float, float]:
    return (lo, fixed, hi, fixed) if along == "x" else (fixed, lo, fixed, hi)


def scene_id_for(split: str, index: int) -> str:
    if split not in SPLIT_POOLS:
        raise SceneError(f"unknown split {split!r}; known: {', '.join(SPLIT_POOLS)}")
    return f"{SPLIT_POOLS[split]}_{index:04d}"


def parse_scene_id(scene_id: str) -> tuple[str, int]:
    """(pool, index) of a procedural scene id; an easier rung of the task ladder prefixes its tier (tiers.py)."""
    m = re.fullmatch(r"(?:(?:%s)-)?(train|unseen|test)_(\d{4,})" % "|".join(TIER_PREFIXES), str(scene_id))
    if not m:
        raise SceneError(f"unknown scene {scene_id!r}: procedural scene ids look like train_0003, unseen_0012, "
                         f"test_0001 or room-train_0003 (a Habitat scene needs a Habitat simulator)")
    return m.group(1), int(m.group(2))


def generate_scene(scene_id: str, min_rooms: int = 2, max_rooms: int = 6) -> SceneSpec:
    """The R2R-tier scene a scene id names: a pure function of the id (and the generator version)."""
    pool, index = parse_scene_id(scene_id)
    if "-" in scene_id:
        raise SceneError(f"{scene_id} is a scene of the {scene_id.split('-')[0]!r} tier: build it with "
                         f"streamvln.sim.tiers.build_scene")
    rng = np.random.default_rng([GENERATOR_VERSION, POOLS[pool], index])
    n_rooms = int(rng.integers(min_rooms, max_rooms + 1))
    slots, edges = _grow_lattice(rng, n_rooms)
    looks = rng.permutation(list(WALL_LOOKS))[:n_rooms]
    floors = list(FLOOR_LOOKS)
    rooms = []
    for k, (i, j) in enumerate(slots):
        cx, cz = i * ROOM_PITCH, j * ROOM_PITCH
        w, e, n, s = (round(float(v), 1) for v in rng.uniform(2.2, 3.6, size=4))
        rooms.append(Room(cx - w, cx + e, cz - n, cz + s, str(looks[k]), floors[int(rng.integers(len(floors)))]))
    doors = []
    for ka, kb in edges:
        (ia, ja), (ib, jb) = slots[ka], slots[kb]
        if (ib, jb) < (ia, ja):
            ka, kb, (ia, ja), (ib, jb) = kb, ka, (ib, jb), (ia, ja)
        a, b = rooms[ka], rooms[kb]
        axis = "x" if ib > ia else "z"
        lo, hi = (max(a.min_z, b.min_z), min(a.max_z, b.max_z)) if axis == "x" else \
                 (max(a.min_x, b.min_x), min(a.max_x, b.max_x))
        width = round(float(rng.uniform(1.0, 1.4)), 2)
        start = round(float(rng.uniform(lo + 0.4, hi - 0.4 - width)), 2)
        doors.append(Door(ka, kb, axis, start, start + width))
    spec = SceneSpec(scene_id, tuple(rooms), tuple(doors), ())
    spec = SceneSpec(scene_id, spec.rooms, spec.doors, tuple(_place_objects(rng, spec)))
    spec.validate()
    return spec


def _grow_lattice(rng, n_rooms: int):
    """Room slots on a 3x3 lattice grown from the middle, a spanning tree of doors, sometimes one loop."""
    slots, edges = [(0, 0)], []
    while len(slots) < n_rooms:
        k = int(rng.integers(len(slots)))
        di, dj = [(1, 0), (-1, 0), (0, 1), (0, -1)][int(rng.integers(4))]
        cand = (slots[k][0] + di, slots[k][1] + dj)
        if cand in slots or max(abs(cand[0]), abs(cand[1])) > 1:
            continue
        slots.append(cand)
        edges.append((k, len(slots) - 1))
    extra = [(a, b) for a in range(len(slots)) for b in range(a + 1, len(slots))
             if abs(slots[a][0] - slots[b][0]) + abs(slots[a][1] - slots[b][1]) == 1
             and (a, b) not in edges and (b, a) not in edges]
    if extra and rng.random() < 0.5:
        edges.append(extra[int(rng.integers(len(extra)))])
    return slots, edges


def _place_objects(rng, spec: SceneSpec) -> list[Obj]:
    """1-3 objects per room, clear of walls, doorways and each other, with unique names in the scene."""
    objects: list[Obj] = []
    mouths = []
    for d in spec.doors:
        a, b = spec.rooms[d.a], spec.rooms[d.b]
        c = d.centre_along
        mouths += [(a.max_x, c), (b.min_x, c)] if d.axis == "x" else [(c, a.max_z), (c, b.min_z)]
    kinds = list(KINDS)
    for r, room in enumerate(spec.rooms):
        for _ in range(int(rng.integers(1, 4))):
            for _try in range(30):
                kind = kinds[int(rng.integers(len(kinds)))]
                colour = COLOURS[int(rng.integers(len(COLOURS)))] if kind in COLOURED else None
                rad = KINDS[kind][2]
                x = float(rng.uniform(room.min_x + rad + 0.5, room.max_x - rad - 0.5))
                z = float(rng.uniform(room.min_z + rad + 0.5, room.max_z - rad - 0.5))
                x, z = round(x, 2), round(z, 2)
                obj = Obj(kind, colour, x, z, round(float(rng.uniform(-math.pi, math.pi)), 3), r)
                if any(o.name == obj.name for o in objects):
                    continue
                if any(math.hypot(x - mx, z - mz) < 1.6 for mx, mz in mouths):
                    continue
                if any(math.hypot(x - o.x, z - o.z) < rad + o.radius + 0.9 for o in objects):
                    continue
                objects.append(obj)
                break
    return objects
