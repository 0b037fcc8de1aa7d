"""Hand-built layouts with answers worked out by hand, and episode builders, for the simulator tests."""

from __future__ import annotations

from streamvln.sim.base import heading_to_quaternion
from streamvln.sim.episodes import NavEpisode
from streamvln.sim.world import Door, Obj, Room, SceneSpec

R = 0.18 + 0.05  # agent radius + planning margin: how far paths keep from walls


def two_rooms(doors=((0.5, 1.5),), objects=(), scene_id="hand_two_rooms") -> SceneSpec:
    """Rooms [0,4]x[0,4] and [4,8]x[0,4] sharing the wall x = 4, with doorways at the given z ranges."""
    rooms = (Room(0, 4, 0, 4, "brick_wall", "wood"), Room(4, 8, 0, 4, "marble", "floor_tiles_bw"))
    return SceneSpec(scene_id, rooms, tuple(Door(0, 1, "x", lo, hi) for lo, hi in doors), tuple(objects))


def box(x, z, room=0, colour="red") -> Obj:
    return Obj("box", colour, x, z, 0.0, room)


def nav_episode(scene_id, start, goal, heading=0.0, episode_id=0, reference=None, text="Go to the red box.",
                trajectory_id=None) -> NavEpisode:
    return NavEpisode(
        episode_id=episode_id, trajectory_id=episode_id if trajectory_id is None else trajectory_id,
        scene_id=scene_id, start_position=[start[0], 0.0, start[1]], start_rotation=heading_to_quaternion(heading),
        goals=[{"position": [goal[0], 0.0, goal[1]], "radius": 3.0}],
        reference_path=reference or [[start[0], 0.0, start[1]], [goal[0], 0.0, goal[1]]],
        instruction={"instruction_text": text})
