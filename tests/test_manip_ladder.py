"""The tabletop ladder: rungs in the scene, in synth's output and in closed-loop evaluation; the CLI's refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from streamvln.manip.cli import main
from streamvln.manip.closed_loop import TabletopSim, evaluate
from streamvln.manip.policy import ExpertPolicy, ZeroPolicy
from streamvln.manip.tabletop import Tabletop, TabletopConfig
from streamvln.manip.tasks import RUNGS, block_pos, get_rung


def test_rungs_and_their_scenes():
    assert list(RUNGS) == ["one-block", "named-block", "full"]
    assert get_rung("one-block").tasks == ("lift_red_block",) and get_rung("full").max_tasks == 5
    with pytest.raises(ValueError, match="unknown rung"):
        get_rung("two-blocks")
    with pytest.raises(ValueError, match="distinct colours"):
        TabletopConfig(blocks=("red", "pink"))
    env = Tabletop(TabletopConfig(32, 24, blocks=("red",)))
    try:
        places = []
        for seed in range(4):
            scene = env.reset(seed, render=False)["scene_obs"]
            assert np.all(scene[12:] == 0)  # blue and green are not on the table: zeros in CALVIN's layout
            places.append(block_pos(scene, "red")[:2])
        assert len(env.blocks) == 1 and np.ptp(np.array(places), axis=0).min() > 0.02  # the block moves with the seed
    finally:
        env.close()


@pytest.mark.slow
def test_synth_records_the_rung_and_writes_one_task_per_episode(tmp_path):
    from streamvln.manip.synth import SynthConfig, synthesize

    with pytest.raises(ValueError, match="max_tasks must be 1..1"):
        SynthConfig(episodes=2, max_tasks=2, rung="one-block")
    cfg = SynthConfig(episodes=3, val_episodes=0, seed=1, max_tasks=1, static_size=32, gripper_size=24, rung="one-block")
    summary = synthesize(tmp_path / "one", cfg, progress=False)
    assert summary["config"]["rung"] == "one-block"
    assert json.loads((tmp_path / "one" / "synth_config.json").read_text())["rung"] == "one-block"
    assert summary["training"]["spans"] == 3 and summary["training"]["per_task"] == {"lift_red_block": 3}
    frame = np.load(next((tmp_path / "one" / "training").glob("episode_*.npz")), allow_pickle=False)
    assert np.all(frame["scene_obs"][12:] == 0)


@pytest.mark.slow
def test_one_block_rung_in_closed_loop_expert_and_zero(tmp_path):
    sim = TabletopSim(TabletopConfig(blocks=("red",)))
    expert = evaluate(ExpertPolicy(), tmp_path / "expert", tasks=["lift_red_block"], episodes=3, chains=0, sim=sim,
                      num_envs=3, max_steps=120, progress=False)
    zero = evaluate(ZeroPolicy(), tmp_path / "zero", tasks=["lift_red_block"], episodes=3, chains=0, sim=sim,
                    num_envs=3, max_steps=30, progress=False)
    assert expert["tasks"]["success_rate"] == 1.0 and zero["tasks"]["success_rate"] == 0.0
    assert list(expert["config"]["env"]["blocks"]) == ["red"]


def test_eval_cli_refuses_what_a_rung_does_not_have(tmp_path):
    runner = CliRunner()
    cases = [
        (["--rung", "one-block", "--tasks", "push_red_block_left"], "not on rung 'one-block'"),
        (["--rung", "named-block", "--chains", "2"], "no 5-task chains"),
        (["--sim", "libero", "--rung", "one-block"], "--rung chooses a tabletop rung"),
    ]
    for args, message in cases:
        result = runner.invoke(main, ["eval", "--policy", "zero", "--out", str(tmp_path / "x"), *args])
        assert result.exit_code != 0 and message in result.output, (args, result.output)
    result = runner.invoke(main, ["synth", "--out", str(tmp_path / "s"), "--rung", "one-block", "--max-tasks", "3"])
    assert result.exit_code != 0 and "max_tasks must be 1..1" in result.output


@pytest.mark.slow
def test_action_noise_moves_the_arm_off_the_label_only_while_the_gripper_is_open(tmp_path):
    from pipeline.calvin import read_split
    from streamvln.manip.synth import SynthConfig, synthesize

    with pytest.raises(ValueError, match="action_noise"):
        SynthConfig(action_noise=-0.1)
    offsets = {}
    for noise in (0.0, 0.5):
        cfg = SynthConfig(episodes=1, val_episodes=0, seed=2, max_tasks=1, static_size=24, gripper_size=24,
                          rung="one-block", action_noise=noise)
        summary = synthesize(tmp_path / str(noise), cfg, progress=False)
        assert summary["training"]["spans"] == 1 and summary["config"]["action_noise"] == noise
        split = read_split(tmp_path / str(noise) / "training")
        frames = [np.load(split.frame_path(i)) for i in range(split.spans[0].start, split.spans[0].end + 1)]
        # the commanded xy (actions) minus where the TCP was, against the label (rel_actions) x 2 cm
        off = np.array([np.abs(f["actions"][:2] - f["robot_obs"][:2] - f["rel_actions"][:2] * 0.02).max() for f in frames])
        offsets[noise] = (off, np.array([f["rel_actions"][6] > 0 for f in frames]))
    clean, _ = offsets[0.0]
    noisy, open_ = offsets[0.5]
    assert clean.max() < 1e-5  # no noise: the label is what was executed
    assert noisy[open_].mean() > 0.003 and noisy[~open_].max() < 1e-5  # noise on approaches only


def test_manip_table_counts_each_policys_episodes_and_pairs_the_vla_with_the_zero_action(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "manip"
    results = {"closed_loop": [1, 1, 1, 0], "closed_loop_expert": [1, 1, 1, 1], "closed_loop_zero": [0, 0, 0, 1]}
    for folder, done in results.items():
        (run / folder).mkdir(parents=True)
        (run / folder / "eval_config.json").write_text(json.dumps({"rung": "one-block", "execute": "chunk",
                                                                   "env": {"sim": "tabletop"}}))
        (run / folder / "tasks.jsonl").write_text("".join(
            json.dumps({"chain": i, "seed": 10 + i, "tasks": ["lift_red_block"], "completed": d, "steps": [70] * d}) + "\n"
            for i, d in enumerate(done)))
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- manip-table:start -->\nold\n<!-- manip-table:end -->\nafter\n")
    out = subprocess.run([sys.executable, "tools/manip_table", str(run), "--readme", str(readme)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = {line.split("|")[3].strip(): line for line in out.stdout.splitlines()[2:]}
    assert "0.750 (3/4)" in rows["demo VLA"] and "VLA only 3, zero only 1: p = 0.62" in rows["demo VLA"]
    assert "1.000 (4/4)" in rows["scripted expert (upper bound)"] and "0.250 (1/4)" in rows["zero action (baseline)"]
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text and "(3/4)" in text
    # episodes that differ between the VLA and the zero action cannot be paired
    (run / "closed_loop_zero" / "tasks.jsonl").write_text(json.dumps({"chain": 9, "completed": 0}) + "\n")
    out = subprocess.run([sys.executable, "tools/manip_table", str(run)], capture_output=True, text=True)
    assert out.returncode != 0 and "different episodes" in out.stderr
