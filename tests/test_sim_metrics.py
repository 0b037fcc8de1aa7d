"""VLN metrics on hand-worked paths: the numbers are worked out in the comments."""

from __future__ import annotations

import math

import pytest

from streamvln.sim.metrics import EpisodeMeasures, densify, dtw, ndtw, path_length, spl


def test_path_length_spl():
    assert path_length([[0, 0, 0], [3, 0, 4], [3, 0, 5]]) == pytest.approx(6.0)  # 5 + 1
    assert spl(1.0, 4.0, 5.0) == pytest.approx(0.8)  # 4 / max(4, 5)
    assert spl(1.0, 5.0, 4.0) == pytest.approx(1.0)  # shorter than d0 (snapping) caps at 1
    assert spl(0.0, 4.0, 4.0) == 0.0


def test_dtw_and_ndtw():
    # path (0,0) (1,0) (2,0) against reference (0,0) (2,0): the middle point costs 1 either way -> DTW 1
    assert dtw([[0, 0], [1, 0], [2, 0]], [[0, 0], [2, 0]]) == pytest.approx(1.0)
    assert ndtw([[0, 0], [1, 0], [2, 0]], [[0, 0], [2, 0]]) == pytest.approx(math.exp(-1 / (2 * 3.0)))
    # a path identical to the reference: DTW 0, nDTW 1
    assert ndtw([[0, 0], [0, 1], [0, 2]], [[0, 0], [0, 1], [0, 2]]) == pytest.approx(1.0)
    # offset by 1 m everywhere (3 points): DTW 3 -> exp(-3 / (3 * 3))
    assert ndtw([[1, 0], [1, 1], [1, 2]], [[0, 0], [0, 1], [0, 2]]) == pytest.approx(math.exp(-1 / 3))


def test_densify_keeps_ends_and_spacing():
    d = densify([[0, 0], [1, 0]], 0.25)
    assert d.tolist() == [[0, 0], [0.25, 0], [0.5, 0], [0.75, 0], [1, 0]]


def measures(goal_x=4.0):
    # straight corridor: the geodesic is the Euclidean distance to (goal_x, 0, 0)
    return EpisodeMeasures(lambda p: abs(goal_x - p[0]) + abs(p[2]), [0, 0, 0], [[0, 0, 0], [goal_x, 0, 0]],
                           success_distance=3.0, dtw_spacing=1.0)


def walk(m, xs, stop=True, collide_at=()):
    for i, x in enumerate(xs):
        m.update([x, 0, 0], 1, i in collide_at)
    if stop:
        m.update([xs[-1], 0, 0], 0, False)
    return m.result()


def test_success_spl_oracle_and_errors():
    r = walk(measures(), [1, 2, 3])  # stops 1 m from the goal after 3 m: success, SPL 4 / max(4, 3) = 1
    assert (r["success"], r["spl"], r["navigation_error"], r["steps"]) == (1.0, 1.0, 1.0, 4)
    # nDTW: positions 0,1,2,3 vs reference 0,1,2,3,4 (densified at 1 m): DTW 1 (4 to 3) -> exp(-1 / 15)
    assert r["ndtw"] == pytest.approx(math.exp(-1 / 15)) and r["sdtw"] == r["ndtw"]

    r = walk(measures(), [1, 2, 3, 4, 3, 2, 1, 0.5])  # passes the goal, walks back, stops 3.5 m away
    assert r["success"] == 0.0 and r["oracle_success"] == 1.0
    assert r["oracle_navigation_error"] == 0.0 and r["navigation_error"] == pytest.approx(3.5)
    assert r["path_length"] == pytest.approx(7.5) and r["sdtw"] == 0.0

    r = walk(measures(), [1], stop=True)  # exactly 3.0 m away: success needs strictly less
    assert r["success"] == 0.0 and r["oracle_success"] == 0.0


def test_no_stop_is_no_success_and_collisions_count():
    r = walk(measures(), [1, 2, 3, 4], stop=False, collide_at=(1, 2))
    assert r["distance_to_goal"] == 0.0 and r["success"] == 0.0 and r["spl"] == 0.0
    assert r["collisions"] == 2


def test_spl_of_a_detour():
    # goal 4 m away, the agent walks 2 m away first then to the goal: path 2 + 6 = 8 -> SPL 4 / 8
    r = walk(measures(), [-1, -2, -1, 0, 1, 2, 3, 4])
    assert r["success"] == 1.0 and r["spl"] == pytest.approx(0.5)
