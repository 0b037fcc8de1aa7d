"""The RL stage's parts: SFT schedules, group advantages, the clipped loss, rewards, expert intervention."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import ConfigError
from sim_helpers import nav_episode, two_rooms
from streamvln.rl.config import RLConfig, load_rl_config
from streamvln.rl.intervention import Intervention
from streamvln.rl.objective import clipped_policy_loss, group_advantages, sft_weight
from streamvln.rl.rewards import reference_length, step_reward, terminal_reward
from streamvln.sim.base import FORWARD, LEFT, STOP, SimConfig
from streamvln.sim.miniworld_sim import MiniWorldSim

EAST, WEST = -math.pi / 2, math.pi / 2  # headings facing +x and -x


@pytest.mark.parametrize("kind,start,middle,end", [
    ("linear", 1.0, 0.75, 0.5),
    ("cosine", 1.0, 0.75, 0.5),  # 0.5 + 0.25 (1 + cos(pi / 2)) = 0.75 at the middle
    ("exponential", 1.0, math.sqrt(0.5), 0.5),  # 1 x 0.5 ** 0.5
])
def test_sft_schedules_at_start_middle_and_end(kind, start, middle, end):
    cfg = RLConfig(sft_loss_start_weight=1.0, sft_loss_end_weight=0.5, sft_loss_decay_updates=200,
                   sft_loss_decay_type=kind)
    assert sft_weight(0, cfg) == pytest.approx(start)
    assert sft_weight(100, cfg) == pytest.approx(middle)
    assert sft_weight(200, cfg) == pytest.approx(end)
    assert sft_weight(500, cfg) == pytest.approx(end)  # past the decay: the end weight
    if kind == "cosine":  # the guide's run: 1.0 -> 0.9 over 600 updates, 500 trained
        guide = RLConfig()
        assert sft_weight(300, guide) == pytest.approx(0.95) and sft_weight(499, guide) == pytest.approx(0.9068, abs=1e-4)
    assert sft_weight(50, RLConfig(use_hybrid_training=False)) == 0.0


def test_exponential_decay_to_zero_is_refused_and_unknown_keys_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="exponential SFT decay needs"):
        RLConfig(sft_loss_decay_type="exponential", sft_loss_end_weight=0.0).validate()
    (tmp_path / "rl.yaml").write_text("phase: phase2_progress\nlearning_rate: 1.0e-5\nbogus: 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_rl_config(tmp_path / "rl.yaml")
    (tmp_path / "rl.yaml").write_text("phase: phase3_instruction\n")
    with pytest.raises(ConfigError, match="phase must be one of"):
        load_rl_config(tmp_path / "rl.yaml")
    assert load_rl_config(None, group_size=4).group_size == 4


def test_group_advantages_on_hand_made_groups():
    # a clear gap with G = 2: normalised to +-1
    assert group_advantages([3.0, 1.0], std_floor=0.5) == pytest.approx([1.0, -1.0])
    # a tiny gap with G = 2: the floor keeps it tiny (the guide's normalisation would give +-1)
    assert group_advantages([0.05, 0.0], std_floor=0.5) == pytest.approx([0.05, -0.05])
    assert group_advantages([2.0, 2.0, 2.0], std_floor=0.5) == [0.0, 0.0, 0.0]
    # G = 4: mean 1, population std sqrt(((-1)^2 + 0 + 0 + 1^2) / 4) = sqrt(0.5)
    s = math.sqrt(0.5)
    assert group_advantages([0.0, 1.0, 1.0, 2.0], std_floor=0.1) == pytest.approx([-1 / s, 0.0, 0.0, 1 / s])
    assert sum(group_advantages([0.3, -1.2, 4.0], std_floor=0.5)) == pytest.approx(0.0)


def test_clipped_loss_uses_the_true_ratio():
    logp = torch.tensor([-1.0, -2.0])
    loss, ratio = clipped_policy_loss(logp, logp.clone(), torch.tensor([1.0, -1.0]), 0.2)
    assert torch.equal(ratio, torch.ones(2)) and loss.item() == pytest.approx(0.0)  # (-1 + 1) / 2
    new = torch.log(torch.tensor([1.5, 0.5])) + logp
    loss, ratio = clipped_policy_loss(new, logp, torch.tensor([1.0, -1.0]), 0.2)
    assert ratio.tolist() == pytest.approx([1.5, 0.5])
    # A > 0: min(1.5, 1.2) = 1.2; A < 0: min(-0.5, -0.8) = -0.8 -> loss = -(1.2 - 0.8) / 2
    assert loss.item() == pytest.approx(-0.2)


def test_rewards_of_both_phases():
    one, two = RLConfig(phase="phase1_stop"), RLConfig(phase="phase2_progress")
    assert step_reward(one, 5.0, 4.75, False) == pytest.approx(0.05)
    assert step_reward(one, 5.0, 5.0, False) == pytest.approx(-0.05)  # a turn in place
    assert step_reward(one, 5.0, 5.0, True) == pytest.approx(-0.15)  # blocked forward step
    assert step_reward(two, 5.0, 4.75, False) == pytest.approx(0.25)
    assert step_reward(two, 5.0, 5.2, True) == pytest.approx(-0.3)
    # terminal: -d/6, success 2 + SPL term with the real path length, clipped
    assert terminal_reward(one, 1.2, True, agent_length=8.0, ref_length=6.0) == pytest.approx(-0.2 + 2.0 + 0.75)
    assert terminal_reward(one, 6.0, False, agent_length=2.0, ref_length=6.0) == pytest.approx(-1.0)
    assert terminal_reward(one, 90.0, False, agent_length=2.0, ref_length=6.0) == pytest.approx(-10.0)
    ep = nav_episode("x", (0.5, 0.5), (3.5, 4.5), reference=[[0.5, 0.0, 0.5], [3.5, 0.0, 0.5]])
    assert reference_length(ep) == pytest.approx(3.0 + 4.0)  # through to the goal, in x-z


@pytest.fixture(scope="module")
def sim():
    with MiniWorldSim(SimConfig(width=32, height=24)) as s:
        s.register_scene(two_rooms())
        yield s


# a path along z = 1 from the first room through the doorway (z in [0.5, 1.5]) to the second
PATH = [[0.6, 0.0, 1.0], [2.0, 0.0, 1.0], [3.5, 0.0, 1.0], [5.0, 0.0, 1.0], [7.0, 0.0, 1.0]]
EPISODE = nav_episode("hand_two_rooms", (0.6, 1.0), (7.4, 1.0), heading=EAST, reference=PATH)


def walk(sim, iv, cfg, policy_action, steps):
    """Step the episode: the intervention decides who acts; returns the sources and the ending."""
    sources = []
    for _ in range(steps):
        pos, heading = sim.agent_pose()
        d = sim.geodesic(pos, EPISODE.goals[0]["position"])  # also right after a teleport
        who = iv.observe(pos, heading, d)
        if who == "end":
            return sources, "recovery_timeout"
        if who == "expert":
            action = iv.expert_label(sim)
        else:
            action = policy_action(sim)
            verdict = iv.review(action, d)
            if verdict == "premature_stop":
                return sources, verdict
            if verdict == "force_stop":
                action = STOP
                who = "forced"
        sources.append(who)
        sim.step(action)
        if sim.done:
            return sources, "stop" if action == STOP else "limit"
    return sources, "running"


def test_expert_labels_follow_the_path_and_stop_only_at_the_goal(sim):
    cfg = RLConfig()
    sim.reset(EPISODE)
    iv = Intervention(cfg, EPISODE)
    labels = []
    for _ in range(200):
        pos, heading = sim.agent_pose()
        iv.observe(pos, heading, 99.0)  # outside any goal zone: pure path following
        action = iv.expert_label(sim)
        labels.append(action)
        sim.step(action)
        if sim.done:
            break
    assert labels[-1] == STOP and STOP not in labels[:-1]  # B7: no STOP mid-path
    assert sim.metrics()["distance_to_goal"] <= cfg.oracle_goal_radius
    assert sim.metrics()["success"] == 1.0


def test_off_track_hands_over_to_the_expert_until_back_on_track(sim):
    cfg = RLConfig(offtrack_dist_thresh=1.0, heading_guard_dist=0.5, offtrack_patience=3, waypoint_radius=0.3,
                   recovery_dist_thresh=0.5, goal_radius=1.5)
    sim.reset(EPISODE)
    sim.teleport([1.5, 0.0, 3.0], EAST)  # 2 m off the path, in the first room
    iv = Intervention(cfg, EPISODE)
    handed_back = []

    def spin(s):  # a policy that only turns; note where it gets control back
        if iv.in_recovery is False and iv.recoveries:
            handed_back.append(iv.geometry)
        return LEFT

    sources, ending = walk(sim, iv, cfg, spin, 60)
    assert sources[:3] == ["policy", "policy", "expert"]  # the third consecutive off-track step
    assert iv.recoveries == 1 and sources.count("expert") > 3 and ending == "running"
    g = handed_back[0]  # back within 0.5 m of the path and facing along it (< 45 degrees off)
    assert g.distance < 0.5 and g.heading_error < 45


def test_heading_guard_and_recovery_step_cap(sim):
    cfg = RLConfig(offtrack_dist_thresh=3.0, offtrack_heading_thresh_deg=120, heading_guard_dist=0.3,
                   offtrack_patience=2, recovery_max_steps=3, recovery_dist_thresh=0.01, goal_radius=1.0)
    sim.reset(EPISODE)
    sim.teleport([2.0, 0.0, 1.5], WEST)  # 0.5 m from the path, facing back: off by heading (guard 0.3 m)
    iv = Intervention(cfg, EPISODE)
    sources, ending = walk(sim, iv, cfg, lambda s: LEFT, 20)
    assert sources[:2] == ["policy", "expert"] and ending == "recovery_timeout"
    # the same pose with the guard at 3 m (the guide's script): the heading clause adds nothing
    sim.reset(EPISODE)
    sim.teleport([2.0, 0.0, 1.5], WEST)
    guarded = RLConfig(**{**cfg.__dict__, "heading_guard_dist": 3.0})
    iv = Intervention(guarded, EPISODE)
    assert walk(sim, iv, guarded, lambda s: LEFT, 6)[0] == ["policy"] * 6


def test_goal_zone_grace_forced_stop_and_premature_stop(sim):
    cfg = RLConfig(goal_radius=3.0, goal_grace_steps=2, goal_stop_patience=3)
    sim.reset(EPISODE)
    sim.teleport([5.5, 0.0, 1.0], EAST)  # 1.9 m from the goal: in the zone
    iv = Intervention(cfg, EPISODE)
    sources, ending = walk(sim, iv, cfg, lambda s: LEFT, 20)
    # in-zone steps 1-2 are grace; at step grace + patience = 5 the non-STOP choice is replaced by STOP
    # (the guide: grace 7, patience 5 -> the 12th consecutive in-zone non-STOP choice)
    assert sources == ["policy"] * 4 + ["forced"] and ending == "stop"
    assert sim.metrics()["success"] == 1.0  # the simulator counts it; the trainer does not (docs/rl.md)
    sim.reset(EPISODE)  # a STOP 6.8 m from the goal: premature, not executed
    iv = Intervention(cfg, EPISODE)
    assert walk(sim, iv, cfg, lambda s: STOP, 5) == ([], "premature_stop")
    assert not sim.done
    off = RLConfig(goal_stop_patience=0, goal_grace_steps=2)  # 0 turns the forced STOP off
    sim.reset(EPISODE)
    sim.teleport([5.5, 0.0, 1.0], EAST)
    iv = Intervention(off, EPISODE)
    assert walk(sim, iv, off, lambda s: LEFT, 12) == (["policy"] * 12, "running")


def test_a_policy_on_the_path_is_left_alone(sim):
    cfg = RLConfig(offtrack_patience=2)
    sim.reset(EPISODE)
    iv = Intervention(cfg, EPISODE)
    sources, ending = walk(sim, iv, cfg, lambda s: iv.expert_label(s), 200)
    assert set(sources) == {"policy"} and ending == "stop" and iv.recoveries == 0
