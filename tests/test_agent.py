"""The streaming agent: training's token ids, cached = recomputed logits, batched = one at a time, odd answers."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.dialogue import nav_dialogue
from pipeline.tokens import tokenize_dialogue
from streamvln.agent.streaming import AgentConfig, StreamingAgent
from streamvln.agent.turns import TurnBuilder, parse_actions
from streamvln.model.config import StreamVLNConfig
from streamvln.model.modeling import StreamVLNForCausalLM

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = StreamVLNConfig(**yaml.safe_load((ROOT / "configs/model/tiny.yaml").read_text()), attn_implementation="sdpa")
    return StreamVLNForCausalLM(cfg).eval()


def frames(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (36, 48, 3), dtype=np.uint8) for _ in range(n)]


CFG = AgentConfig(num_frames=8, num_history=4, image_size=112, max_new_tokens=6)


def test_parse_actions():
    assert parse_actions("<|im_start|>assistant\n↑↑←→<|im_end|>") == [1, 1, 2, 3]
    assert parse_actions("←STOP↑") == [2, 0, 1]
    assert parse_actions("nothing here") == [0]


@pytest.mark.parametrize("start", [0, 32])
def test_agent_turns_are_the_shards_token_ids(tok, token_ids, start):
    """The agent's window, teacher-forced with the expert's answers, is the training chunk's input_ids."""
    actions = [1, 1, 2, 1, 3, 3, 1, 1, 1, 2, 1, 0]
    instruction = "Leave the brick room through the doorway on your left and stop next to the red box."
    seed = 1234
    turns = nav_dialogue(instruction, actions, has_history=start != 0, num_future_steps=4, rng=random.Random(seed))
    shard_ids, _ = tokenize_dialogue(tok, token_ids, turns)
    builder, rng = TurnBuilder(tok), random.Random(seed)
    from pipeline.dialogue import CONJUNCTIONS
    agent_ids = [builder.open_window(instruction, start != 0, rng.choice(CONJUNCTIONS))]
    for k in range(0, len(actions), 4):
        agent_ids.append(builder.answer_ids(actions[k:k + 4]))
        if k + 4 < len(actions):
            agent_ids.append(builder.next_turn(rng.choice(CONJUNCTIONS)))
    agent_ids.append(builder.newline)
    assert np.concatenate(agent_ids).tolist() == shard_ids.tolist()


def run(agent, streams, steps, envs=None):
    envs = list(range(len(streams))) if envs is None else envs
    actions, texts = [], []
    for t in range(steps):
        out = agent.act([streams[i][t] for i in envs], envs)
        actions.append([out[i] for i in envs])
        texts.append([agent.envs[i].last_text for i in envs])
    return actions, texts


def test_cached_logits_equal_a_full_recompute_across_a_window_and_a_memory_opening(tok, tiny_model):
    stream = frames(0, 20)  # windows of 8 steps: openings at 0, 8 (memory of 4 frames), 16
    cached = StreamingAgent(tiny_model, tok, CFG)
    recompute = StreamingAgent(tiny_model, tok, AgentConfig(**{**CFG.__dict__, "use_cache": False}))
    for a in (cached, recompute):
        a.reset(0, "ep", "Walk to the red box.")
    opened_with_memory = 0
    for t in range(20):
        ca = cached.act([stream[t]])
        ra = recompute.act([stream[t]])
        assert ca == ra
        if cached.envs[0].last_logits is not None:
            torch.testing.assert_close(cached.envs[0].last_logits, recompute.envs[0].last_logits, atol=1e-4, rtol=1e-4)
        opened_with_memory += int(t > 0 and len(cached.envs[0].window_embeds) == 1)
    assert cached.envs[0].turns == recompute.envs[0].turns > 2
    # the cached agent really reused its cache: the last window holds more than one turn
    assert cached.envs[0].cache is not None and cached.envs[0].cache.get_seq_length() > 0


def test_batched_environments_act_exactly_as_one_at_a_time(tok, tiny_model):
    streams = [frames(s, 12) for s in (1, 2, 3)]
    instructions = ["Walk to the red box.", "Turn around and leave the marble room, then stop by the desk.",
                    "Go."]
    batched = StreamingAgent(tiny_model, tok, CFG, num_envs=3)
    for i, text in enumerate(instructions):
        batched.reset(i, f"ep{i}", text)
    together, texts = run(batched, streams, 12)
    for i, text in enumerate(instructions):
        alone = StreamingAgent(tiny_model, tok, CFG)
        alone.reset(0, f"ep{i}", text)
        acts, txt = run(alone, [streams[i]], 12)
        assert [a[0] for a in acts] == [a[i] for a in together]
        assert [t[0] for t in txt] == [t[i] for t in texts]


@pytest.mark.parametrize("answer", ["↑↑↑", "↑←↑→↑", "", "↑"])
def test_any_number_of_actions_per_turn_never_breaks_the_agent(tok, tiny_model, answer, monkeypatch):
    agent = StreamingAgent(tiny_model, tok, CFG)
    agent.reset(0, "ep", "Walk.")
    reply = tok(answer, add_special_tokens=False)["input_ids"] + [agent.turns.im_end]
    monkeypatch.setattr(agent, "_generate", lambda envs, embeds: [list(reply) for _ in envs])
    opened = []
    original = agent._turn_ids

    def spy(env):
        ids, frame_idx = original(env)
        opened.append((len(env.frames) - 1, int((ids == -300).sum()), len(frame_idx)))
        return ids, frame_idx
    monkeypatch.setattr(agent, "_turn_ids", spy)
    stream = frames(5, 30)
    actions = [agent.act([stream[t]])[0] for t in range(30)]
    expected = parse_actions(answer)
    assert actions[: len(expected)] == expected
    for step, memory_tokens, n_frames in opened:
        # every opening after step 0 carries its memory frames: never <memory> without them (#80)
        assert n_frames == 1 + (min(4, step) if memory_tokens else 0)
        assert memory_tokens == (1 if step > 0 and n_frames > 1 else 0)


def test_an_expert_episode_through_the_agent_gives_the_nav_shards_token_ids(tok, token_ids, tiny_model, tmp_path,
                                                                              monkeypatch):
    """Simulator expert trajectory -> nav shard samples; the same episode streamed through the agent with the
    expert's answers (teacher forcing) gives, window by window, exactly each chunk's input_ids."""
    from PIL import Image

    from pipeline.config import NavShardConfig
    from pipeline.nav import build_episode, sample_rng
    from pipeline.reader import list_frames, read_source
    from streamvln.sim.base import SimConfig
    from streamvln.sim.episodes import EpisodeGenConfig, generate_episodes, write_episodes
    from streamvln.sim.trajectories import TrajectoryConfig, write_trajectories

    eps, _ = generate_episodes(EpisodeGenConfig(scenes=1, per_scene=1, r2r_per_path=1, rxr_per_path=0))
    write_episodes(tmp_path / "e.json.gz", eps)
    write_trajectories(tmp_path / "e.json.gz", tmp_path / "SimR2R", TrajectoryConfig(sim=SimConfig(width=32, height=24)))
    (episode,), _ = read_source(tmp_path / "SimR2R")
    shard_cfg = NavShardConfig(image_size=32, num_frames=8, num_future_steps=4, num_history=4)
    samples, rejects = build_episode(episode, shard_cfg, tok, token_ids)
    assert not rejects and len(samples) >= 3  # several windows: memory openings are covered
    shard_ids = {int(s.key.rsplit("-s", 1)[1]): s.input_ids.tolist() for s in samples}

    acts = list(episode.actions[1:]) + [0]
    agent = StreamingAgent(tiny_model, tok, AgentConfig(num_frames=8, num_history=4, image_size=112))
    agent.reset(0, episode.episode_id, episode.instructions[0])
    windows: dict[int, list] = {}
    original = agent._turn_ids

    def turn_ids(env):
        now = len(env.frames) - 1
        if not env.window_open:  # the shard's conjunction draws for the chunk starting here
            env.rng = sample_rng(shard_cfg.seed, episode, 0, now)
            windows[now] = []
        ids, frames_used = original(env)
        windows[max(windows)].append(ids)
        return ids, frames_used

    def teacher(envs, embeds):
        now = len(envs[0].frames) - 1
        end = min((now // 8 + 1) * 8, len(acts))
        answer = agent.turns.answer_ids(acts[now:min(now + 4, end)]).tolist()
        windows[max(windows)].append(np.asarray(answer[:-1]))  # the window keeps all but the last token
        return [answer]

    monkeypatch.setattr(agent, "_turn_ids", turn_ids)
    monkeypatch.setattr(agent, "_generate", teacher)
    frame_files = list_frames(episode)
    for t in range(len(acts)):
        rgb = np.asarray(Image.open(f"{episode.frame_dir}/{frame_files[t]}").convert("RGB"))
        assert agent.act([rgb])[0] == acts[t]
    assert sorted(windows) == sorted(shard_ids)
    for start, pieces in windows.items():
        # the shard's text ends with the last answer's <|im_end|> and newline
        ids = np.concatenate(pieces + [[agent.turns.im_end], agent.turns.newline]).tolist()
        assert ids == shard_ids[start], f"window at step {start}"
