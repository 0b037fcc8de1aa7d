"""Route instructions: R2R-style short paraphrases and RxR-style long ones, generated from the path walked.

A route is read off the reference path: the rooms it passes (named by their walls' look), the
doorway by which it leaves the start room (ahead, left, right or behind the start heading), the
turns it makes in each room, the hallways, and the object it ends next to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .base import bearing, wrap
from .metrics import densify
from .world import FLOOR_LOOKS, Obj, SceneSpec


@dataclass
class Leg:
    room: int  # room index, -1 for a hallway
    turn: str  # how the path turns inside it: "left", "right" or "straight"
    length: float


@dataclass
class Route:
    start_room: int
    exit_side: str  # where the first doorway is from the start heading
    legs: list[Leg]  # rooms and hallways after the start room, in order
    goal: Obj


def read_route(spec: SceneSpec, path_xz, start_heading: float, goal: Obj) -> Route:
    pts = densify(path_xz, 0.1)
    areas = [spec.room_at(x, z) for x, z in pts]
    areas = [a if a is not None else -1 for a in areas]
    runs: list[tuple[int, int, int]] = []  # (area, first index, last index)
    for i, a in enumerate(areas):
        if runs and runs[-1][0] == a:
            runs[-1] = (a, runs[-1][1], i)
        else:
            runs.append((a, i, i))
    start_room = runs[0][0]
    exit_at = pts[runs[1][1]] if len(runs) > 1 else pts[-1]
    # aim at the doorway itself, not the first corner of the path, to say where the doorway is
    rel = math.degrees(wrap(bearing(pts[0], exit_at) - start_heading))
    exit_side = "ahead" if abs(rel) <= 45 else "behind" if abs(rel) >= 135 else ("left" if rel > 0 else "right")
    legs = []
    for area, i0, i1 in runs[1:]:
        a, b = pts[max(i0 - 1, 0)], pts[i0]
        c, d = pts[i1], pts[min(i1 + 1, len(pts) - 1)]
        turn_deg = math.degrees(wrap(bearing(c, d) - bearing(a, b))) if i1 > i0 else 0.0
        turn = "straight" if abs(turn_deg) < 35 else ("left" if turn_deg > 0 else "right")
        legs.append(Leg(area, turn, float(np.linalg.norm(pts[i1] - pts[i0]))))
    return Route(start_room, exit_side, legs, goal)


_EXIT = {"ahead": "ahead of you", "left": "on your left", "right": "on your right", "behind": "behind you"}


def r2r_instruction(spec: SceneSpec, route: Route, rng: np.random.Generator) -> str:
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    start = spec.rooms[route.start_room].name
    verb = pick(["Leave", "Exit", "Walk out of"])
    first = f"{verb} the {start} through the doorway {_EXIT[route.exit_side]}"
    if route.exit_side == "behind":
        first = f"Turn around and {verb.lower()} the {start} through the doorway behind you"
    parts = [first]
    rooms_between = [leg for leg in route.legs[:-1]]
    for leg in rooms_between:
        if leg.room == -1:
            if leg.length >= 1.0:
                parts.append(pick(["walk down the hallway", "follow the hallway", "go along the corridor"]))
        else:
            parts.append(pick(["walk through the", "cross the", "go through the"]) + f" {spec.rooms[leg.room].name}")
    goal_room = spec.rooms[route.goal.room].name
    parts.append(pick(["stop next to", "stop beside", "wait by"]) + f" the {route.goal.name} in the {goal_room}")
    text = ", ".join(parts[:-1]) + " and " + parts[-1] + "."
    return text[0].upper() + text[1:]


def rxr_instruction(spec: SceneSpec, route: Route, rng: np.random.Generator) -> str:
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    start = spec.rooms[route.start_room]
    sentences = [f"You are standing in a {start.look} room with a {FLOOR_LOOKS.get(start.floor_tex, 'plain')} floor."]
    seen = [o for o in spec.objects if o.room == route.start_room and o != route.goal]
    if seen:
        sentences.append(f"There is a {seen[0].name} in here.")
    if route.exit_side == "ahead":
        sentences.append("Look for the doorway in front of you and walk out through it.")
    elif route.exit_side == "behind":
        sentences.append("Turn all the way around; the doorway you want is behind you. Go through it.")
    else:
        sentences.append(f"Turn to your {route.exit_side}, you will see a doorway there. Walk out through it.")
    for leg in route.legs:
        if leg.room == -1:
            if leg.length >= 1.0:
                sentences.append(pick(["Keep going straight down the hallway.", "Follow the short corridor."]))
            continue
        room = spec.rooms[leg.room]
        floor = FLOOR_LOOKS.get(room.floor_tex, "plain")
        if leg.room == route.goal.room:
            sentences.append(f"You enter a {room.look} room with a {floor} floor.")
            break
        sentences.append(f"You come into a {room.look} room with a {floor} floor.")
        sentences.append({"left": "Turn left and head for the doorway on that side.",
                          "right": "Turn right and head for the doorway on that side.",
                          "straight": "Walk straight across it to the doorway on the far side."}[leg.turn])
    sentences.append(f"Find the {route.goal.name} in this room, walk up to it and stop right next to it.")
    return " ".join(sentences)
