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
from streamvln.sim.base import FORWARD, LEFT, RIGHT, STOP, SimConfig
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


# ---- rollouts and updates with a real (tiny) model ----------------------------------------------

ARROWS, IM_END = [76286, 71858, 51018], 151645  # ↑ ← →
STOP_ID, NEWLINE = 50669, 198


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir):
    """A tiny untrained model whose output layer only knows the arrows and (weaker) <|im_end|>, so its
    random answers are moves, not noise that parses as STOP; and a few generated episodes."""
    from pathlib import Path

    import yaml

    from pipeline.qwen_tokenizer import load_tokenizer
    from streamvln.model.config import StreamVLNConfig
    from streamvln.model.modeling import StreamVLNForCausalLM
    from streamvln.sim.episodes import EpisodeGenConfig, generate_episodes, write_episodes

    root = tmp_path_factory.mktemp("rl")
    torch.manual_seed(0)
    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs/model/tiny.yaml").read_text())
    model = StreamVLNForCausalLM(StreamVLNConfig(**{**raw, "tie_word_embeddings": False}))
    with torch.no_grad():
        head = torch.zeros_like(model.lm_head.weight)
        head[ARROWS] = torch.randn(len(ARROWS), head.shape[1]) * 3
        head[IM_END] = torch.randn(head.shape[1])
        model.lm_head.weight.copy_(head)
    model.save_pretrained(root / "ckpt")
    load_tokenizer(tokenizer_dir).save_pretrained(root / "ckpt")
    eps, _ = generate_episodes(EpisodeGenConfig(split="train", scenes=2, per_scene=2, seed=3, r2r_per_path=1,
                                                rxr_per_path=0))
    write_episodes(root / "train.json.gz", eps)
    return root, eps


def rl_cfg(**kw):
    base = dict(num_envs=2, group_size=2, num_episodes_per_update=2, max_steps_per_episode=24, tensorboard=False,
                temperature=1.0, mini_batch_size=3, ppo_epochs=2, learning_rate=1e-3, goal_radius=1.0,
                offtrack_patience=3)
    return RLConfig(**{**base, **kw})


def test_recomputed_logprob_is_the_rollouts_and_the_first_ratio_is_exactly_one(world):
    from streamvln.agent.rollout import rollout
    from streamvln.rl.logprob import sequence_logprobs
    from streamvln.rl.policy import Member, RLPolicy
    from streamvln.rl.train import load_policy_model
    from streamvln.rl.update import TorchStep, update_policy

    root, eps = world
    # a hair-trigger intervention, so the expert takes over within these short episodes
    cfg = rl_cfg(offtrack_dist_thresh=0.3, waypoint_radius=0.2, heading_guard_dist=0.1, offtrack_heading_thresh_deg=60,
                 offtrack_patience=2, recovery_dist_thresh=0.3, recovery_heading_thresh_deg=20)
    agent = load_policy_model(str(root / "ckpt"), cfg)
    agent.cfg.num_frames, agent.cfg.num_history = 8, 4  # windows close and reopen with memory within 24 steps
    agent.cfg.max_new_tokens = 5  # at most 4 actions per answer, as the model is trained to give
    sims = [MiniWorldSim(SimConfig(width=32, height=24)) for _ in range(2)]
    try:
        policy = RLPolicy(agent, sims, cfg)
        members = [Member(ep, m, 0, cfg.seed) for ep in eps[:2] for m in range(2)]
        trajectories = [r.info for r in rollout(sims, policy, members)]
    finally:
        for s in sims:
            s.close()
    decisions = [d for t in trajectories for d in t["decisions"] if d.kind == "policy"]
    oracle = [d for t in trajectories for d in t["decisions"] if d.kind == "oracle"]
    assert oracle and all(d.sft and len(d.steps) <= 4 for d in oracle)  # expert chunks, each an SFT target
    assert all(t["steps"][k].source == "expert" for t in trajectories for d in t["decisions"] if d.kind == "oracle"
               for k in d.steps)
    assert len(decisions) > 4 and any(len(d.context) > 2 for d in decisions)  # later turns of a window
    assert any(p[0] == "turn" and p[3] > 0 for d in decisions for p in d.context)  # a window with memory
    with torch.no_grad():
        logp, _, _ = sequence_logprobs(agent, [(d.frames, d.context, d.tokens) for d in decisions], cfg.temperature)
    assert logp.tolist() == pytest.approx([d.logp for d in decisions], abs=1e-3)
    # a group's members run the same episode under the same instruction (B1)
    assert trajectories[0]["member"].episode.instruction_text == trajectories[1]["member"].episode.instruction_text
    params = [p for p in agent.model.parameters() if p.requires_grad]
    stats = update_policy(agent, TorchStep(torch.optim.AdamW(params, lr=1e-3), params, cfg.max_grad_norm), trajectories,
                          cfg, 0)
    assert stats["first_ratio"] == 1.0 and stats["logp_drift"] < 1e-3
    assert stats["policy_decisions"] == len(decisions) and stats["ratio_std"] > 0  # later minibatches moved
    assert stats["sft_samples"] >= len(oracle) and stats["sft_loss"] > 0
    assert not agent.model.training  # back in eval mode for the next rollouts (B17)


def test_rl_cli_trains_logs_exports_and_resumes_to_the_uninterrupted_update(world, tmp_path):
    import json

    from click.testing import CliRunner
    from safetensors.torch import load_file

    from streamvln.rl.cli import main

    root, _ = world
    base = ["--checkpoint", str(root / "ckpt"), "--episodes", str(root / "train.json.gz"), "--width", "32",
            "--height", "24", "--num-envs", "2"]
    sets = [a for k, v in rl_cfg().__dict__.items() if k in ("max_steps_per_episode", "temperature", "mini_batch_size",
            "ppo_epochs", "learning_rate", "goal_radius", "offtrack_patience", "tensorboard", "num_episodes_per_update")
            for a in ("--set", f"{k}={v}")]
    r = CliRunner().invoke(main, [*base, *sets, "--output-dir", str(tmp_path / "full"), "--num-updates", "2"])
    assert r.exit_code == 0, r.output
    assert "update 2/2 SR" in r.output and (tmp_path / "full" / "final" / "model.safetensors").exists()
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [row["update"] for row in rows] == [1, 2]
    for key in ("sr", "spl", "oracle_rate", "intervention_rate", "episode_length", "policy_loss", "sft_loss",
                "sft_weight", "entropy", "ratio_mean", "ratio_std", "rollout_time", "update_time"):
        assert key in rows[0], key
    # interrupted after update 1, resumed: update 2 is the uninterrupted run's
    r = CliRunner().invoke(main, [*base, *sets, "--output-dir", str(tmp_path / "cut"), "--num-updates", "1"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, [*base, *sets, "--output-dir", str(tmp_path / "cut"), "--num-updates", "2",
                                  "--resume"])
    assert r.exit_code == 0, r.output
    again = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    timing = {"rollout_time", "update_time", "env_steps_per_s"}
    assert {k: v for k, v in again[-1].items() if k not in timing} == {k: v for k, v in rows[-1].items()
                                                                        if k not in timing}
    a = load_file(tmp_path / "full" / "checkpoints" / "update-000002" / "trainable.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "update-000002" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    refused = CliRunner().invoke(main, [*base, *sets, "--output-dir", str(tmp_path / "cut"), "--num-updates", "3",
                                        "--resume", "--set", "learning_rate=0.5"])
    assert refused.exit_code == 2 and "learning_rate differ" in refused.output


def test_one_forward_per_window_gives_each_decision_its_own_logprobs_and_gradients(world):
    """sequence_logprobs runs a window's successive decisions as one sequence (chains); every number and
    gradient equals the per-decision forwards'."""
    from streamvln.agent.rollout import rollout
    from streamvln.rl.logprob import chains, sequence_logprobs
    from streamvln.rl.policy import Member, RLPolicy
    from streamvln.rl.train import load_policy_model

    root, eps = world
    cfg = rl_cfg(enable_recovery=False)
    agent = load_policy_model(str(root / "ckpt"), cfg)
    agent.cfg.num_frames, agent.cfg.num_history, agent.cfg.max_new_tokens = 8, 4, 5
    sims = [MiniWorldSim(SimConfig(width=32, height=24)) for _ in range(2)]
    try:
        policy = RLPolicy(agent, sims, cfg)
        trajectories = [r.info for r in rollout(sims, policy, [Member(eps[0], m, 0, cfg.seed) for m in range(2)])]
    finally:
        for s in sims:
            s.close()
    items = [(d.frames, d.context, d.tokens) for t in trajectories for d in t["decisions"] if d.kind == "policy"]
    groups = chains(items)
    assert sorted(i for c in groups for i in c) == list(range(len(items)))
    assert len(groups) < len(items) and max(map(len, groups)) >= 2  # windows of several decisions
    assert any(p[0] == "turn" and p[3] > 0 for _, ctx, _ in items for p in ctx)  # and windows with memory
    params = [p for p in agent.model.parameters() if p.requires_grad]

    def run(calls):
        agent.model.zero_grad()
        out = [sequence_logprobs(agent, c, 0.7) for c in calls]
        logp, ent, nll = (torch.cat([o[j] for o in out]) for j in range(3))
        (logp.sum() + ent.sum() + nll.sum()).backward()
        return logp.detach(), ent.detach(), nll.detach(), [p.grad.clone() for p in params]

    together, alone = run([items]), run([[it] for it in items])
    for a, b in zip(together[:3], alone[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(together[3], alone[3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # window_minibatches: every window whole in one minibatch, the minibatches at least mini_batch_size
    # decisions, and the first ratio still exactly 1
    from dataclasses import replace

    import numpy as np

    from streamvln.rl.update import TorchStep, _window_minibatches, update_policy
    pg = [(d, 0.0) for t in trajectories for d in t["decisions"] if d.kind == "policy"]
    batches = _window_minibatches(pg, 2, np.random.default_rng(0))
    where = {int(k): j for j, b in enumerate(batches) for k in b}
    assert sorted(where) == list(range(len(pg))) and all(len(b) >= 2 for b in batches[:-1])
    assert all(len({where[k] for k in chain}) == 1 for chain in groups)
    stats = update_policy(agent, TorchStep(torch.optim.AdamW(params, lr=1e-3), params, 1.0), trajectories,
                          replace(cfg, window_minibatches=True), 0)
    assert stats["first_ratio"] == 1.0 and stats["logp_drift"] < 1e-3 and stats["policy_decisions"] > 0


GUIDE_SCENARIOS = {  # grpo-sft-hybrid.md section 5: the guide's four command lines, beyond the required flags
    "quick check": "--num_updates 100 --num_episodes_per_update 1 --group_size 1",
    "standard": "--num_updates 500 --num_episodes_per_update 1 --group_size 2 --use_hybrid_training "
                "--sft_loss_start_weight 1.0 --sft_loss_end_weight 0.9",
    "full": "--num_updates 1000 --num_episodes_per_update 2 --group_size 2 --use_hybrid_training "
            "--sft_loss_start_weight 1.5 --sft_loss_end_weight 0.8",
    "ablation": "--disable_recovery --use_hybrid_training",
}


def test_the_guides_flags_in_both_spellings_and_what_is_refused(world, tmp_path):
    from click.testing import CliRunner

    from streamvln.rl.cli import GUIDE_VALUES, guide_overrides, main

    root, _ = world
    flags = {name: None for name, _ in GUIDE_VALUES} | {k: False for k in (
        "use_hybrid_training", "sft_use_policy_steps", "sft_oracle_only", "enable_recovery", "disable_recovery",
        "use_wandb", "use_deepspeed")}
    assert guide_overrides({**flags, "sft_oracle_only": True, "disable_recovery": True, "group_size": 3}, None) == {
        "sft_oracle_only": True, "enable_recovery": False, "group_size": 3}
    assert guide_overrides({**flags, "use_deepspeed": True}, None)["deepspeed"].endswith("configs/deepspeed/zero2.json")
    base = ["--model_path", str(root / "ckpt"), "--episodes", str(root / "train.json.gz"), "--output_path",
            str(tmp_path / "out")]
    r = CliRunner().invoke(main, [*base, "--habitat_config_path", "config/vln_r2r.yaml"])
    assert r.exit_code == 2 and "no Habitat here" in r.output and "--episodes" in r.output
    r = CliRunner().invoke(main, [*base, "--enable_recovery", "--disable-recovery"])
    assert r.exit_code == 2 and "contradict" in r.output
    r = CliRunner().invoke(main, [*base, "--group_size", "1", "--set", "advantage_std_floor=0"])
    assert r.exit_code == 1 and "group_size 1 needs advantage_std_floor > 0" in r.output
    assert not (tmp_path / "out").exists()  # refused before anything ran


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(GUIDE_SCENARIOS))
def test_the_guides_scenarios_run_as_written(world, tmp_path, scenario):
    """Each scenario's flags as the guide writes them, with our paths and a tiny model; the trailing
    --num_updates 1 (the last value wins) keeps it to one update."""
    import json

    from click.testing import CliRunner

    from streamvln.rl.cli import main

    root, _ = world
    small = ["--num_updates", "1", "--num-envs", "2", "--max-episodes", "2", "--width", "32", "--height", "24",
             "--set", "max_steps_per_episode=12", "--set", "tensorboard=false"]
    args = ["--model_path", str(root / "ckpt"), "--episodes", str(root / "train.json.gz"), "--output_path",
            str(tmp_path / "out"), *GUIDE_SCENARIOS[scenario].split(), *small]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "out" / "rl_config.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and (tmp_path / "out" / "final").is_dir()
    words = GUIDE_SCENARIOS[scenario].split()
    for flag, value in zip(words, words[1:] + [None]):
        if flag.startswith("--") and value is not None and not value.startswith("--") and flag != "--num_updates":
            assert cfg[flag[2:]] == type(cfg[flag[2:]])(value), flag
    assert cfg["use_hybrid_training"] is True and cfg["num_updates"] == 1
    assert cfg["enable_recovery"] is (scenario != "ablation")
    if scenario == "quick check":  # groups of 1: every advantage is 0, the update is SFT (and entropy) alone
        assert cfg["group_size"] == 1 and rows[0]["policy_loss"] == 0


def test_reference_config_is_the_defaults_and_the_demo_config_loads():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    assert load_rl_config(root / "configs/rl/reference.yaml") == RLConfig()
    demo = load_rl_config(root / "configs/rl/demo.yaml")
    assert demo.group_size == 4 and demo.lora is not None and demo.lora.r == 32


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_two_ranks_under_torchrun_split_the_groups_and_stay_in_sync(world, tmp_path, engine):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root, _ = world
    repo = Path(__file__).resolve().parent.parent
    torchrun = Path(sys.executable).parent / "torchrun"
    sets = ["num_updates=2", "num_episodes_per_update=2", "group_size=2", "num_envs=2", "max_steps_per_episode=12",
            "tensorboard=false", "mini_batch_size=2", "learning_rate=0.001", "temperature=1.0"]
    if engine == "deepspeed":
        sets.append(f"deepspeed={repo / 'configs/deepspeed/zero2.json'}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo), "DS_ACCELERATOR": "cpu"}
    port = "29641" if engine == "torch" else "29643"
    result = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", port,
                             str(repo / "tests" / "rl_dist_check.py"), str(root / "ckpt"), str(root / "train.json.gz"),
                             str(tmp_path / "out"), *sets], capture_output=True, text=True, env=env, cwd=repo)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "RL-DIST-CHECK-OK" in result.stdout
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == [1, 2] and all(r["rollouts"] == 4 for r in rows)  # 2 episodes x 2, both ranks
    assert (tmp_path / "out" / "checkpoints" / "update-000002" / "state.json").exists()
    if engine == "deepspeed":  # every rank wrote its optimizer partition into the update's folder
        assert len(list((tmp_path / "out" / "checkpoints" / "update-000002" / "engine").glob("zero_pp_rank_*"))) == 2
        # and the run continues on one process: the two partitions are merged and re-cut
        more = [a for item in sets if not item.startswith("num_updates") for a in ("--set", item)]
        result = subprocess.run([sys.executable, "-m", "streamvln.rl", "--checkpoint", str(root / "ckpt"), "--episodes",
                                 str(root / "train.json.gz"), "--output-dir", str(tmp_path / "out"), "--width", "32",
                                 "--height", "24", "--num-updates", "3", "--resume", *more],
                                capture_output=True, text=True, env=env, cwd=repo)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
        assert [r["update"] for r in rows] == [1, 2, 3] and rows[-1]["rollouts"] == 4


@pytest.mark.slow
def test_deepspeed_update_trains_and_resumes_to_the_uninterrupted_update(world, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    root, _ = world
    repo = Path(__file__).resolve().parent.parent
    args = [sys.executable, "-m", "streamvln.rl", "--checkpoint", str(root / "ckpt"), "--episodes",
            str(root / "train.json.gz"), "--width", "32", "--height", "24", "--num-envs", "2", "--deepspeed",
            str(repo / "configs/deepspeed/zero2.json")]
    for item in ("max_steps_per_episode=12", "num_episodes_per_update=2", "tensorboard=false", "learning_rate=0.001",
                 "temperature=1.0", "mini_batch_size=2"):
        args += ["--set", item]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}

    def run(out, updates, *extra):
        r = subprocess.run([*args, "--output-dir", str(out), "--num-updates", str(updates), *extra],
                           capture_output=True, text=True, env=env, cwd=repo)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    full = run(tmp_path / "full", 2)
    run(tmp_path / "cut", 1)
    cut = run(tmp_path / "cut", 2, "--resume")
    timing = {"rollout_time", "update_time", "env_steps_per_s"}
    assert {k: v for k, v in cut[-1].items() if k not in timing} == {k: v for k, v in full[-1].items() if k not in timing}
    assert full[-1]["policy_decisions"] > 0 and (tmp_path / "full" / "checkpoints" / "update-000002" / "engine").is_dir()
    a = load_file(tmp_path / "full" / "checkpoints" / "update-000002" / "trainable.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "update-000002" / "trainable.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_disabled_recovery_means_no_intervention_at_all(sim):
    cfg = RLConfig(enable_recovery=False, goal_grace_steps=1, goal_stop_patience=1, offtrack_patience=1)
    sim.reset(EPISODE)
    sim.teleport([1.5, 0.0, 3.5], EAST)  # far off the path
    iv = Intervention(cfg, EPISODE)
    assert walk(sim, iv, cfg, lambda s: LEFT, 6) == (["policy"] * 6, "running") and iv.recoveries == 0
    assert iv.review(STOP, 50.0) == "execute"  # a far STOP is executed, as in plain GRPO
    sim.reset(EPISODE)
    sim.teleport([7.0, 0.0, 1.0], EAST)
    iv = Intervention(cfg, EPISODE)
    assert walk(sim, iv, cfg, lambda s: LEFT, 5) == (["policy"] * 5, "running")  # no forced STOP either


def group_infos(model_dir, episode, cfg) -> list[dict]:
    """One group of two rollouts of `episode` by the model in model_dir: each rollout's info."""
    from streamvln.agent.rollout import rollout
    from streamvln.rl.policy import Member, RLPolicy
    from streamvln.rl.train import load_policy_model

    agent = load_policy_model(str(model_dir), cfg)
    sims = [MiniWorldSim(SimConfig(width=32, height=24)) for _ in range(2)]
    try:
        return [r.info for r in rollout(sims, RLPolicy(agent, sims, cfg), [Member(episode, m, 0, cfg.seed) for m in range(2)])]
    finally:
        for s in sims:
            s.close()


def test_the_stall_option_ends_a_spinning_policys_episode_as_a_charged_failure(world, tmp_path):
    """Why spinning paid (docs/rl.md): turning in place near the start is never off the path, so nothing takes
    over, and it costs 0.05 a step. With stall_patience, its episode ends as a failure charged stall_penalty."""
    from pipeline.qwen_tokenizer import load_tokenizer
    from streamvln.model.build import build_model

    root, eps = world
    model = build_model(None, str(root / "ckpt"))
    with torch.no_grad():  # a spinner: the final norm keeps one unit, whose sign picks ← or →
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[ARROWS[1], 0], model.lm_head.weight[ARROWS[2], 0] = 1e3, -1e3
    model.save_pretrained(tmp_path / "spinner")
    load_tokenizer(str(root / "ckpt")).save_pretrained(tmp_path / "spinner")
    runs = {patience: group_infos(tmp_path / "spinner", eps[0], rl_cfg(stall_patience=patience, stall_penalty=penalty))
            for patience, penalty in ((0, 0.0), (6, 2.0))}
    guide, stalled = runs[0], runs[6]
    assert all(s.source == "policy" and s.action in (LEFT, RIGHT) for t in guide + stalled for s in t["steps"])
    d = guide[0]["metrics"]["distance_to_goal"]
    for t in guide:  # the guide's: no intervention; the step limit at the start, 0.05 a turn
        assert t["outcome"] == "step_limit" and len(t["steps"]) == 24 and t["interventions"] == 0
        assert t["return"] == pytest.approx(23 * -0.05 - d / 6)
    for t in stalled:  # 6 turns without coming closer: a failure, charged
        assert t["outcome"] == "stalled" and len(t["steps"]) == 6 and t["interventions"] == 1
        assert t["metrics"]["distance_to_goal"] == pytest.approx(d)
        assert t["return"] == pytest.approx(5 * -0.05 - d / 6 - 2.0)
    with pytest.raises(ConfigError, match="stall_penalty needs stall_patience"):
        RLConfig(stall_penalty=1.0).validate()


def test_the_premature_stop_penalty_charges_a_refused_far_stop(world, tmp_path):
    """A policy that says STOP at its start, far from the goal: the STOP is refused and the episode ends as a
    failure. The guide charges it only the terminal reward; premature_stop_penalty charges it that much more."""
    from pipeline.qwen_tokenizer import load_tokenizer
    from streamvln.model.build import build_model

    root, eps = world
    model = build_model(None, str(root / "ckpt"))
    with torch.no_grad():  # a stopper: no layer writes to the residual, so the answer reads the last prompt token
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[NEWLINE, 0] = 1.0  # the token before every answer ("assistant\n"): unit 0 > 0
        model.lm_head.weight[STOP_ID, 0] = 1e3
    model.save_pretrained(tmp_path / "stopper")
    load_tokenizer(str(root / "ckpt")).save_pretrained(tmp_path / "stopper")
    runs = {penalty: group_infos(tmp_path / "stopper", eps[0], rl_cfg(premature_stop_penalty=penalty))
            for penalty in (0.0, 1.5)}
    d = runs[0.0][0]["metrics"]["distance_to_goal"]
    assert d > 1.0  # far from the goal: a premature STOP
    for penalty, infos in runs.items():
        for t in infos:
            assert t["outcome"] == "premature_stop" and len(t["steps"]) == 1 and t["steps"][0].source == "refused"
            assert t["return"] == pytest.approx(-d / 6 - penalty)
    with pytest.raises(ConfigError, match="premature_stop_penalty"):
        RLConfig(premature_stop_penalty=-1.0).validate()


def test_logger_writes_jsonl_tensorboard_and_an_offline_wandb_run(tmp_path, monkeypatch):
    import json

    from streamvln.rl.train import Logger

    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline by default: no network, no account
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = Logger(tmp_path, RLConfig(use_wandb=True, tensorboard=True, wandb_run_name="test"))
    logger.write({"update": 1, "sr": 0.25, "outcomes": {"stop": 1}})
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["sr"] == 0.25
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_metrics_png_draws_each_curve_where_its_values_lie_and_keeps_earlier_updates_after_a_resume(tmp_path):
    import json

    from PIL import Image

    from streamvln.rl.plot import MARGIN, PANEL_H, PANEL_W
    from streamvln.rl.train import Logger

    blue = (31, 119, 180)
    left, right, top, bottom = MARGIN, PANEL_W - 12, 24, PANEL_H - 28

    def dot(image, x, y) -> bool:  # a curve point drawn within 3 px of (x, y)
        return any(image.getpixel((x + dx, y + dy)) == blue for dx in range(-3, 4) for dy in range(-3, 4))

    cfg = RLConfig(tensorboard=False)
    logger = Logger(tmp_path, cfg)
    for u, sr in ((1, 0.0), (2, 0.5)):
        logger.write({"update": u, "sr": sr, "return": -sr, "oracle_rate": 0.3, "intervention_rate": 2.0})
    logger.close()
    (tmp_path / "metrics.jsonl").open("a").write(json.dumps({"update": 3, "sr": 0.0}) + "\n")  # logged, then cut off
    logger = Logger(tmp_path, cfg, start=2)  # resumed from update 2: the picture still starts at update 1
    logger.write({"update": 3, "sr": 1.0, "return": -1.0, "oracle_rate": 0.3, "intervention_rate": 2.0})
    logger.close()
    assert [json.loads(x)["sr"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0.0, 0.5, 1.0]
    image = Image.open(tmp_path / "metrics.png").convert("RGB")
    assert image.size == (2 * PANEL_W, 2 * PANEL_H)
    # SR (top right panel) rises from the bottom left corner to the top right one; the return (top left) falls
    assert dot(image, PANEL_W + left, bottom) and dot(image, PANEL_W + right, top)
    assert not dot(image, PANEL_W + left, top)
    assert dot(image, left, top) and dot(image, right, bottom) and not dot(image, left, bottom)
    # a flat curve (the oracle rate, bottom left) runs through the middle of its panel
    assert dot(image, (left + right) // 2, PANEL_H + (top + bottom) // 2)
    # a fresh run in the same folder starts its log and its picture anew
    logger = Logger(tmp_path, cfg)
    logger.write({"update": 1, "sr": 1.0, "return": -1.0, "oracle_rate": 0.3, "intervention_rate": 2.0})
    logger.close()
    assert [json.loads(x)["sr"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1.0]
    assert not dot(Image.open(tmp_path / "metrics.png").convert("RGB"), PANEL_W + left, bottom)


def test_same_time_steps_gives_the_control_the_longest_rl_runs_time(tmp_path):
    """make demo-rl's one control serves several RL runs: never less time than any of them had."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    for name, seconds in (("a", [(10.0, 5.0), (20.0, 5.0)]), ("b", [(30.0, 30.0)])):  # 40 s and 60 s
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(
            json.dumps({"update": k + 1, "rollout_time": r, "update_time": u}) + "\n" for k, (r, u) in enumerate(seconds)))
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "run_config.json").write_text(json.dumps({"mix": {"batch_size": 8}, "train": {"grad_accum": 1}}))
    (sft / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 100, "samples_per_s": 60.0}, {"step": 200, "samples_per_s": 100.0}, {"eval": 1, "samples_per_s": 1.0})))
    root = Path(__file__).resolve().parent.parent

    def steps(*runs):
        out = subprocess.run([sys.executable, str(root / "tools/same_time_steps"), *map(str, runs)],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return int(out.stdout)

    assert steps(tmp_path / "a", sft) == 400  # 40 s at 80 samples/s / 8 a step = 10 steps/s
    assert steps(tmp_path / "a", tmp_path / "b", sft) == 600
    bad = subprocess.run([sys.executable, str(root / "tools/same_time_steps"), str(sft)], capture_output=True, text=True)
    assert bad.returncode != 0 and "usage" in bad.stderr
