"""Scenes, navigable grid and geodesic distances on hand-built layouts with known answers (no rendering)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sim_helpers import R, box, two_rooms
from streamvln.sim.navgrid import NavGrid
from streamvln.sim.world import (KINDS, SceneError, SceneSpec, Door, generate_scene, parse_scene_id, scene_id_for)


def around_corner(start, goal, corner, r):
    """Shortest path from start to goal that wraps around a disc of radius r at corner (on the far side)."""
    s, g, c = (np.asarray(p, float) for p in (start, goal, corner))
    ds, dg = np.linalg.norm(s - c), np.linalg.norm(g - c)
    phi = math.acos(np.dot(s - c, g - c) / (ds * dg))
    arc = 2 * math.pi - phi - math.acos(r / ds) - math.acos(r / dg)
    return math.sqrt(ds**2 - r**2) + math.sqrt(dg**2 - r**2) + r * arc


def test_straight_line_in_a_room():
    grid = NavGrid(two_rooms())
    assert grid.geodesic((1.0, 1.0), (3.0, 3.0)) == pytest.approx(2 * math.sqrt(2), abs=0.02)


def test_wall_between_start_and_goal_goes_round_the_door_jamb():
    # Start and goal face each other through the wall x = 4; the only doorway is z in [0.5, 1.5], so
    # the path wraps round the jamb at (4, 1.5) at the clearance R: 5.317 m, not the straight 4 m.
    grid = NavGrid(two_rooms())
    expected = around_corner((2, 3), (6, 3), (4, 1.5), R)
    assert expected == pytest.approx(5.317, abs=1e-3)
    assert grid.geodesic((2.0, 3.0), (6.0, 3.0)) == pytest.approx(expected, rel=0.015)
    path = grid.path((2.0, 3.0), (6.0, 3.0))
    assert min(p[1] for p in path) < 1.5  # through the doorway, below the jamb
    assert all(math.isfinite(v) for p in path for v in p)


def test_blocked_doorway_takes_the_other_door_and_a_fully_blocked_one_is_unreachable():
    open_ = NavGrid(two_rooms(doors=((0.5, 1.5), (2.8, 3.8))))
    assert open_.geodesic((2.0, 3.3), (6.0, 3.3)) == pytest.approx(4.0, abs=0.02)
    blocked = NavGrid(two_rooms(doors=((0.5, 1.5), (2.8, 3.8)), objects=(box(4.0, 3.3),)))
    assert blocked.geodesic((2.0, 3.3), (6.0, 3.3)) == pytest.approx(
        around_corner((2, 3.3), (6, 3.3), (4, 1.5), R), rel=0.015)
    sealed = NavGrid(two_rooms(objects=(box(4.0, 1.0),)))
    assert sealed.geodesic((2.0, 3.0), (6.0, 3.0)) == math.inf
    assert sealed.path((2.0, 3.0), (6.0, 3.0)) is None


def test_collision_matches_miniworld_rule_and_grid_keeps_the_margin():
    grid = NavGrid(two_rooms(objects=(box(2.0, 2.0),)))
    assert grid.collides(0.1, 2.0)  # 0.1 m from the wall x = 0 < radius 0.18
    assert not grid.collides(0.2, 3.0)  # 0.2 m from it: fits, but inside the planning margin
    assert not grid.is_navigable(0.2, 3.0) and grid.is_navigable(0.3, 3.0)
    assert grid.collides(2.0 + 0.495 + 0.17, 2.0) and not grid.collides(2.0 + 0.495 + 0.19, 2.0)  # box radius 0.495
    assert grid.collides(-1.0, 2.0)  # outside every room
    assert not grid.collides(4.0, 1.0)  # in the doorway


def test_walls_leave_the_doorway_open():
    walls = two_rooms().walls()
    # shared wall x = 4 from both rooms, each split round z in [0.5, 1.5]
    on_x4 = sorted((min(s[1], s[3]), max(s[1], s[3])) for s in walls if s[0] == s[2] == 4.0)
    assert on_x4 == [(0.0, 0.5), (0.0, 0.5), (1.5, 4.0), (1.5, 4.0)]


def test_scene_ids_pools_and_determinism():
    assert scene_id_for("train", 3) == "train_0003" == scene_id_for("val_seen", 3)
    assert scene_id_for("val_unseen", 3) == "unseen_0003"
    assert generate_scene("train_0003") == generate_scene("train_0003")
    assert generate_scene("train_0003") != generate_scene("unseen_0003")
    for bad in ("17DRP5sb8fy", "train_3", "", "val_0001"):
        with pytest.raises(SceneError, match="unknown scene"):
            parse_scene_id(bad)


@pytest.mark.parametrize("scene_id", ["train_0000", "train_0007", "unseen_0002"])
def test_generated_scenes_are_connected_and_varied(scene_id):
    spec = generate_scene(scene_id)
    assert 2 <= len(spec.rooms) <= 6 and len(spec.doors) >= len(spec.rooms) - 1
    assert len({r.wall_tex for r in spec.rooms}) == len(spec.rooms)  # rooms are told apart by their look
    assert len({o.name for o in spec.objects}) == len(spec.objects) >= len(spec.rooms)
    grid = NavGrid(spec)
    centres = [r.centre for r in spec.rooms]
    for c in centres[1:]:
        assert math.isfinite(grid.geodesic(centres[0], c)), f"{scene_id}: room at {c} is not reachable"


def test_spec_validation():
    bad = SceneSpec("bad", two_rooms().rooms, (Door(0, 1, "z", 0.5, 1.5),), ())
    with pytest.raises(SceneError, match="does not join"):
        bad.validate()
    with pytest.raises(SceneError, match="unique"):
        two_rooms(objects=(box(1, 1), box(3, 3))).validate()


def test_object_radii_table_is_complete():
    assert set(KINDS) == {"box", "ball", "chair", "desk", "barrel", "cone", "duck"}
