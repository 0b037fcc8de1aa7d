"""LIBERO (optional extra): official tasks and initial states, the env adapter, the scripted expert and the VLA
policy in closed loop on LIBERO's success predicates, demonstrations to CALVIN format and shards.

Skipped, with the reason, where the extra is not installed (`pip install -e '.[libero]'`, make install-libero)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from streamvln.manip.libero import LiberoUnavailable, import_libero

try:
    import_libero()
except LiberoUnavailable as e:
    pytest.skip(f"LIBERO tests skipped: {e}", allow_module_level=True)

from pipeline.manip import run_calvin  # noqa: E402
from streamvln.manip.closed_loop import Chain, evaluate  # noqa: E402
from streamvln.manip.libero import (  # noqa: E402
    LiberoEnv, init_states, package_version, select_tasks, suite_tasks)
from streamvln.manip.libero_sim import LiberoSim  # noqa: E402
from streamvln.manip.libero_synth import LiberoSynthConfig, synthesize  # noqa: E402
from streamvln.manip.policy import ExpertPolicy, VLAPolicy, ZeroPolicy  # noqa: E402
from test_manip import TINY_VLA, W, build_model_from, shard_cfg  # noqa: E402

pytestmark = pytest.mark.slow
SUITE = "libero_object"


@pytest.fixture(scope="module")
def soup():
    return suite_tasks(SUITE)[0]


def test_official_tasks_and_initial_states(soup):
    tasks = suite_tasks(SUITE)
    assert len(tasks) == 10 and soup.name == "pick_up_the_alphabet_soup_and_place_it_in_the_basket"
    assert soup.language == "pick up the alphabet soup and place it in the basket"
    assert all(t.language.startswith("pick up the") and Path(t.bddl).is_file() for t in tasks)
    states = init_states(soup)
    assert states.shape[0] == 50 and states.dtype.kind == "f"  # numeric npz, read without pickle
    chosen = select_tasks(SUITE, "3,pick_up_the_milk_and_place_it_in_the_basket")
    assert [t.index for t in chosen] == [3, tasks[[t.name for t in tasks].index(chosen[1].name)].index]
    with pytest.raises(ValueError, match="has no task 'nope'"):
        select_tasks(SUITE, "nope")
    with pytest.raises(ValueError, match="unknown LIBERO suite"):
        suite_tasks("libero_nope")


def test_env_observations_actions_and_determinism(soup):
    env = LiberoEnv()
    state = init_states(soup)[0]
    obs = env.reset(soup, state)
    assert obs["rgb_static"].shape == obs["rgb_gripper"].shape == (128, 128, 3)
    assert obs["rgb_static"].dtype == np.uint8 and obs["robot_obs"].shape == (15,)
    # MuJoCo reads pixels bottom row first: the adapter turns them right way up
    assert np.array_equal(obs["rgb_static"], env.raw["agentview_image"][::-1])
    assert np.array_equal(obs["rgb_gripper"], env.raw["robot0_eye_in_hand_image"][::-1])
    assert obs["robot_obs"][-1] == 1.0 and obs["robot_obs"][6] > 0.07  # gripper open, fingers apart
    z0 = obs["robot_obs"][2]
    up = [env.step(np.array([0, 0, 0.5, 0, 0, 0, -1.0])) for _ in range(8)]
    after = env.observe()
    assert after["robot_obs"][2] > z0 + 0.03  # +z moves up (OSC_POSE units)
    assert after["robot_obs"][-1] == -1.0 and after["robot_obs"][6] < obs["robot_obs"][6]  # CALVIN's sign: closes
    assert up[0][6] == -1.0 and abs(up[0][2] - (z0 + 0.5 * 0.05)) < 1e-5  # the absolute target commanded
    # a fresh simulation each episode: the same initial state gives the same frames after other episodes
    again = env.reset(soup, state)
    assert np.array_equal(again["rgb_static"], obs["rgb_static"])
    assert np.array_equal(again["robot_obs"], obs["robot_obs"])
    assert not env.success()
    env.close()


def test_expert_and_baselines_in_closed_loop_on_official_states(tmp_path, soup, tok):
    sim = LiberoSim(SUITE)
    summary = evaluate(ExpertPolicy(sim.make_expert), tmp_path / "expert", tasks=[soup.name], episodes=2, chains=0,
                       sim=sim, num_envs=2, progress=False)
    assert summary["tasks"]["per_task"][soup.name] == {"success": 1.0, "attempts": 2}
    assert summary["config"]["env"]["suite"] == SUITE and summary["config"]["max_steps"] == 280
    assert summary["config"]["env"]["libero"] == package_version()
    rows = [json.loads(line) for line in (tmp_path / "expert" / "tasks.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [0, 1] and all(r["completed"] == 1 for r in rows)  # init states 0 and 1
    zero = evaluate(ZeroPolicy(), tmp_path / "zero", tasks=[soup.name], episodes=1, chains=0, sim=sim,
                    max_steps=30, progress=False)
    assert zero["tasks"]["success_rate"] == 0.0
    model = build_model_from(TINY_VLA, head="lstm", history_type="post")
    policy = VLAPolicy(model, tok, "What action should the robot take to {instruction}?", 28)
    vla = evaluate(policy, tmp_path / "vla", tasks=[soup.name], episodes=2, chains=0, sim=sim, num_envs=2,
                   max_steps=5, progress=False)
    assert vla["tasks"]["chains"] == 2 and all(len(h) <= W for h in policy.history.values())
    with pytest.raises(ValueError, match="no chains"):
        sim.make_chains("chains", [soup.name], 1, 0)


def test_expert_grasps_a_bowl_by_its_rim_on_a_raised_table(tmp_path):
    """libero_spatial: the table stands 0.9 m high and a bowl is wider than the open fingers."""
    sim = LiberoSim("libero_spatial")
    task = suite_tasks("libero_spatial")[0]
    env = sim.make_env()
    sim.start(env, Chain(0, 0, [task.name]), render=False)
    expert = sim.make_expert(task.name, env)
    assert expert.grip[1] > 0.02 and expert.carry_z > 1.1  # off-centre rim grasp; carried 30 cm above that table
    env.close()
    summary = evaluate(ExpertPolicy(sim.make_expert), tmp_path, tasks=[task.name], episodes=1, chains=0, sim=sim,
                       progress=False)
    assert summary["tasks"]["success_rate"] == 1.0


def test_libero_synth_writes_calvin_format_that_shards(tmp_path, tokenizer_dir):
    cfg = LiberoSynthConfig(SUITE, "0", episodes=1, val_episodes=0, seed=3)
    summary = synthesize(tmp_path / "a", cfg, progress=False)
    train = summary["training"]
    assert train["spans"] == 1 and train["expert_failures"] == []
    split = tmp_path / "a" / "training"
    files = sorted(split.glob("episode_*.npz"))
    assert len(files) == train["frames"] > 50
    with np.load(files[0], allow_pickle=False) as f:
        assert f["rgb_static"].shape == (128, 128, 3) and f["rel_actions"].shape == (7,)
        assert np.abs(f["rel_actions"][:6]).max() <= 0.65  # within the CALVIN normalisation's clip
    assert json.loads((tmp_path / "a" / "synth_config.json").read_text())["libero"] == package_version()
    # deterministic: a second run writes the same bytes
    synthesize(tmp_path / "b", cfg, progress=False)
    assert [p.read_bytes() for p in files] == [p.read_bytes() for p in sorted((tmp_path / "b" / "training").glob("*.npz"))]
    # resumable: an episode whose marker is missing (killed before it) is done again, and only it
    (split / ".done" / "000000.json").unlink()
    files[-1].unlink()
    again = synthesize(tmp_path / "a", cfg, progress=False)
    assert again["written_now"] == 1 and again["training"] == train
    assert [p.read_bytes() for p in files] == [p.read_bytes() for p in sorted((tmp_path / "b" / "training").glob("*.npz"))]
    with pytest.raises(ValueError, match="other options"):
        synthesize(tmp_path / "a", LiberoSynthConfig(SUITE, "0", episodes=2, val_episodes=0, seed=3), progress=False)
    shards = run_calvin(split, tmp_path / "shards", shard_cfg(), tokenizer_dir, progress=False)
    assert shards["manifest"]["counts"]["samples_written"] == train["frames"] - W  # as the tabletop synth test
    # a task whose goal is not one In/On predicate is counted as a reject, with no frames
    goal = select_tasks("libero_goal", "all")
    drawer = next(t for t in goal if "drawer" in t.name and t.name.startswith("open"))
    other = synthesize(tmp_path / "c", LiberoSynthConfig("libero_goal", drawer.name, 1, 0), progress=False)
    assert other["training"]["frames"] == 0 and other["training"]["spans"] == 0
    assert "no scripted expert" in other["training"]["expert_failures"][0]["reason"]
