"""The MiniWorld simulator: exact actions, determinism, several envs in one process, collisions, the expert, bad episodes."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys

import numpy as np
import pytest

from sim_helpers import box, nav_episode, two_rooms
from streamvln.sim.base import FORWARD, LEFT, RIGHT, STOP, SimConfig, SimulatorError
from streamvln.sim.episodes import EpisodeGenConfig, generate_episodes
from streamvln.sim.miniworld_sim import MiniWorldSim
from streamvln.sim.world import KINDS, generate_scene

SMALL = SimConfig(width=64, height=48)


@pytest.fixture(scope="module")
def sim():
    with MiniWorldSim(SMALL) as s:
        s.register_scene(two_rooms())
        s.register_scene(two_rooms(doors=((0.5, 1.5), (2.8, 3.8)), objects=(box(4.0, 3.3),), scene_id="hand_blocked"))
        s.register_scene(two_rooms(objects=(box(4.0, 1.0),), scene_id="hand_sealed"))
        yield s


def test_headless_is_set_by_the_package():
    out = subprocess.run([sys.executable, "-c", "import os; import streamvln.sim; print(os.environ['PYGLET_HEADLESS'])"],
                         capture_output=True, text=True, env={"PATH": ""}, check=True)
    assert out.stdout.strip() == "true"


def test_exact_actions_and_observation(sim):
    obs = sim.reset(nav_episode("hand_two_rooms", (2.0, 3.0), (6.0, 3.0), heading=0.0))
    assert obs.rgb.shape == (48, 64, 3) and obs.rgb.dtype == np.uint8
    assert obs.position.tolist() == [2.0, 0.0, 3.0] and obs.heading == pytest.approx(0.0)
    obs = sim.step(FORWARD)  # heading 0 faces -z
    assert obs.position[0] == pytest.approx(2.0) and obs.position[2] == pytest.approx(2.75) and not obs.collided
    for _ in range(24):
        obs = sim.step(LEFT)
    assert math.remainder(obs.heading, 2 * math.pi) == pytest.approx(0.0, abs=1e-9)  # 24 x 15 deg = 360
    obs = sim.step(RIGHT)
    assert obs.heading == pytest.approx(-math.radians(15))
    assert obs.step == 26 and not sim.done
    sim.step(STOP)
    assert sim.done
    with pytest.raises(RuntimeError, match="after the episode ended"):
        sim.step(FORWARD)


def test_forward_into_a_wall_is_a_recorded_collision(sim):
    sim.reset(nav_episode("hand_two_rooms", (2.0, 0.5), (6.0, 3.0), heading=0.0))  # 0.5 m from the wall z = 0
    positions = [sim.step(FORWARD) for _ in range(3)]
    assert [o.collided for o in positions] == [False, True, True]
    assert positions[-1].position[2] == pytest.approx(0.25)  # MiniWorld refuses the step, no sliding
    assert sim.metrics()["collisions"] == 2


def test_step_limit_ends_the_episode():
    with MiniWorldSim(SimConfig(width=16, height=16, max_steps=5)) as s:
        s.register_scene(two_rooms())
        s.reset(nav_episode("hand_two_rooms", (2.0, 3.0), (6.0, 3.0)))
        for _ in range(5):
            s.step(LEFT)
        assert s.done and s.metrics()["steps"] == 5 and s.metrics()["success"] == 0.0


def test_camera_defaults_are_the_references():
    cfg = SimConfig()
    assert (cfg.width, cfg.height, cfg.hfov, cfg.camera_height, cfg.max_steps, cfg.agent_radius) == \
        (640, 480, 79.0, 1.25, 500, 0.18)


def rollout_hash(s, ep, actions):
    h = hashlib.sha256(s.reset(ep).rgb.tobytes())
    for a in actions:
        h.update(s.step(a).rgb.tobytes())
    return h.hexdigest()


ACTIONS = [LEFT, LEFT, FORWARD, FORWARD, RIGHT, FORWARD, LEFT, FORWARD, FORWARD, RIGHT, RIGHT, FORWARD]
SCRIPT = """
import sys
from streamvln.sim.base import SimConfig
from streamvln.sim.episodes import EpisodeGenConfig, generate_episodes
from streamvln.sim.miniworld_sim import MiniWorldSim
sys.path.insert(0, "tests")
from test_sim_miniworld import ACTIONS, rollout_hash
ep = generate_episodes(EpisodeGenConfig(scenes=1, per_scene=1))[0][0]
print(rollout_hash(MiniWorldSim(SimConfig(width=64, height=48)), ep, ACTIONS))
"""


@pytest.mark.slow
def test_same_scene_and_actions_give_identical_frames_in_and_across_processes(sim):
    ep = generate_episodes(EpisodeGenConfig(scenes=1, per_scene=1))[0][0]
    first = rollout_hash(sim, ep, ACTIONS)
    sim.reset(nav_episode("hand_two_rooms", (2.0, 3.0), (6.0, 3.0)))  # another scene in between
    assert rollout_hash(sim, ep, ACTIONS) == first
    other = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    assert other.stdout.strip().splitlines()[-1] == first


def test_two_simulators_in_one_process_keep_their_own_scenes(sim):
    # MiniWorld alone compiles every scene into display list 1: the second env would overwrite the first's.
    ep = generate_episodes(EpisodeGenConfig(scenes=1, per_scene=1))[0][0]
    alone = [sim.reset(ep).rgb] + [sim.step(a).rgb for a in ACTIONS[:4]]
    with MiniWorldSim(SMALL) as other:
        other_ep = generate_episodes(EpisodeGenConfig(split="val_unseen", scenes=1, per_scene=1))[0][0]
        frames, other_frames = [sim.reset(ep).rgb], [other.reset(other_ep).rgb]
        for a in ACTIONS[:4]:  # interleaved
            frames.append(sim.step(a).rgb)
            other_frames.append(other.step(a).rgb)
    assert all(np.array_equal(a, b) for a, b in zip(alone, frames))
    assert not np.array_equal(frames[0], other_frames[0])


@pytest.mark.slow
def test_grid_collision_agrees_with_miniworld(sim):
    """The navigable grid's exact collision test says what MiniWorld's own intersect says, everywhere."""
    for scene_id in ("train_0001", "unseen_0004"):
        sim.load_scene(scene_id)
        env, grid = sim._env, sim.grid
        assert len(env.wall_segs) == len(grid.walls)
        rng = np.random.default_rng(0)
        min_x, max_x, min_z, max_z = sim.spec.bounds()
        checked = 0
        for x, z in zip(rng.uniform(min_x, max_x, 3000), rng.uniform(min_z, max_z, 3000)):
            if sim.spec.room_at(x, z) is None:
                continue  # MiniWorld has no notion of outside; walls keep the agent in
            mw = bool(env.intersect(env.agent, np.array([x, 0.0, z]), env.agent.radius))
            assert grid.collides(x, z) == mw, (scene_id, x, z)
            checked += 1
        assert checked > 1000


def test_object_radii_match_miniworld(sim):
    from miniworld.entity import Box, MeshEnt
    for kind, (mesh, size, radius, _) in KINDS.items():
        ent = Box("red", size) if kind == "box" else MeshEnt("ball_red" if kind == "ball" else mesh, size)
        assert ent.radius == pytest.approx(radius, abs=1e-6), kind


def expert_actions(s, goal, radius, limit=100):
    actions = []
    while len(actions) < limit:
        a = s.expert_action(goal, radius)
        actions.append(a)
        if a == STOP:
            break
        s.step(a)
    return actions


def test_expert_turns_round_for_a_goal_behind(sim):
    sim.reset(nav_episode("hand_two_rooms", (2.0, 2.0), (2.0, 3.5), heading=0.0))  # facing -z, goal at +z
    assert expert_actions(sim, [2.0, 0.0, 3.5], 0.3) == [LEFT] * 12 + [FORWARD] * 5 + [STOP]


def test_expert_goes_through_the_doorway_and_stops_within_the_radius(sim):
    ep = nav_episode("hand_two_rooms", (2.0, 3.0), (6.0, 3.0), heading=-math.pi / 2)  # facing +x, the wall
    sim.reset(ep)
    actions = expert_actions(sim, ep.goal_position, 0.25, limit=200)
    assert actions[-1] == STOP and actions[0] == LEFT  # toward the doorway at z < 1.5 (north)
    pos, _ = sim.agent_pose()
    assert sim.geodesic(pos, ep.goal_position) <= 0.25
    m = sim.metrics()
    assert m["collisions"] == 0 and m["path_length"] == pytest.approx(5.5, abs=0.5)


def test_expert_takes_the_open_door_and_stops_for_an_unreachable_goal(sim):
    sim.reset(nav_episode("hand_blocked", (2.0, 3.3), (6.0, 3.3), heading=-math.pi / 2))
    assert sim.expert_action([6.0, 0.0, 3.3], 0.25) == LEFT  # the straight door is blocked by the box
    sim.reset(nav_episode("hand_sealed", (2.0, 3.0), (3.0, 3.0)))
    assert sim.expert_action([6.0, 0.0, 3.0], 0.25) == STOP  # no path: Habitat's follower error -> STOP
    assert sim.geodesic([2.0, 0.0, 3.0], [6.0, 0.0, 3.0]) == math.inf


@pytest.mark.parametrize("episode, kind", [
    (nav_episode("17DRP5sb8fy", (2.0, 3.0), (6.0, 3.0)), "unknown scene"),
    (nav_episode("hand_two_rooms", (0.05, 3.0), (6.0, 3.0)), "start inside an obstacle"),
    (nav_episode("hand_two_rooms", (2.0, 3.0), (9.0, 3.0)), "goal outside the navigable space"),
    (nav_episode("hand_sealed", (2.0, 3.0), (6.0, 3.0)), "goal unreachable"),
])
def test_bad_episodes_are_clear_errors(sim, episode, kind):
    with pytest.raises(SimulatorError) as e:
        sim.reset(episode)
    assert e.value.kind == kind
    assert "17DRP5sb8fy" in str(e.value) or f"episode {episode.episode_id}" in str(e.value)


def test_generated_scene_renders_its_rooms(sim):
    spec = generate_scene("train_0002")
    sim.load_scene("train_0002")
    assert len(sim._env.rooms) == len(spec.rooms) + sum(1 for d in spec.doors)  # a hallway per door
