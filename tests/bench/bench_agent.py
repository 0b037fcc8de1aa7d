"""Agent benchmark: decisions/s and steps/s for N batched environments; KV-cached vs recomputed decision time."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline.qwen_tokenizer import load_tokenizer
from streamvln.agent.streaming import AgentConfig, StreamingAgent
from streamvln.model.config import StreamVLNConfig
from streamvln.model.modeling import StreamVLNForCausalLM

ROOT = Path(__file__).resolve().parents[2]


def tiny():
    torch.manual_seed(0)
    cfg = StreamVLNConfig(**yaml.safe_load((ROOT / "configs/model/tiny.yaml").read_text()), attn_implementation="sdpa")
    return StreamVLNForCausalLM(cfg).eval()


def main():
    torch.set_num_threads(2)
    tok = load_tokenizer(ROOT / "build" / "qwen2_tokenizer")
    model = tiny()
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (168, 224, 3), dtype=np.uint8) for _ in range(64)]
    # A random model writes no <|im_end|>: cap answers at 6 tokens (a trained one writes ~6: 4 symbols, header, end)
    base = dict(num_frames=32, num_history=8, image_size=112, max_new_tokens=6)

    for n in (1, 2, 4, 8):
        agent = StreamingAgent(model, tok, AgentConfig(**base), num_envs=n)
        for i in range(n):
            agent.reset(i, f"ep{i}", "Leave the brick room through the doorway on your left and stop next to the red box.")
        steps = 48
        t = time.perf_counter()
        for s in range(steps):
            agent.act([frames[(s + i) % 64] for i in range(n)])
        decisions = sum(e.turns for e in agent.envs)
        dt = time.perf_counter() - t
        print(f"N={n}: {decisions / dt:.1f} decisions/s, {steps * n / dt:.1f} env steps/s "
              f"(random model: every step is a decision)")

    closed_loop(tok)

    # ms per decision at the end of a 32-step window: cached prefill of one turn vs the whole window again
    for use_cache in (True, False):
        agent = StreamingAgent(model, tok, AgentConfig(**base, use_cache=use_cache))
        agent.reset(0, "ep", "Walk to the red box.")
        times = []
        for s in range(32):
            t = time.perf_counter()
            agent.act([frames[s]])
            times.append(time.perf_counter() - t)
        label = "KV-cached " if use_cache else "recomputed"
        print(f"{label}: {np.mean(times[-4:]) * 1000:.1f} ms per decision at the end of the window "
              f"(first {times[0] * 1000:.1f} ms)")
        if use_cache:
            cached = np.mean(times[-4:])
        else:
            print(f"cached is {np.mean(times[-4:]) / cached:.1f}x faster at the end of a window")


def closed_loop(tok):
    """Real simulators (224x168) driven by the demo's trained model (it writes actions; a random model
    writes none, which parses as STOP), 8 episodes capped at 64 steps, N environments in lockstep."""
    from streamvln.agent.policies import AgentPolicy
    from streamvln.agent.rollout import rollout
    from streamvln.model.build import build_model
    from streamvln.sim.base import SimConfig
    from streamvln.sim.episodes import EpisodeGenConfig, generate_episodes
    from streamvln.sim.miniworld_sim import MiniWorldSim

    ckpt = ROOT / "runs" / "demo" / "final"
    if not (ckpt / "config.json").exists():
        print("closed loop: skipped, no runs/demo/final (make demo trains it)")
        return
    model = build_model(None, str(ckpt)).eval()
    eps, _ = generate_episodes(EpisodeGenConfig(scenes=8, per_scene=1, seed=0, r2r_per_path=1, rxr_per_path=0))
    for n in (1, 2, 4, 8):
        sims = [MiniWorldSim(SimConfig(width=224, height=168, max_steps=64)) for _ in range(n)]
        agent = StreamingAgent(model, tok, AgentConfig(num_frames=32, num_history=8, image_size=112), num_envs=n)
        t = time.perf_counter()
        results = list(rollout(sims, AgentPolicy(agent), eps))
        dt = time.perf_counter() - t
        steps = sum(r.metrics["steps"] for r in results)
        print(f"closed loop N={n}: {steps / dt:.1f} env steps/s, {agent.decisions / dt:.1f} decisions/s "
              f"({steps} steps, {agent.decisions} decisions, render included)")
        for sim in sims:
            sim.close()


if __name__ == "__main__":
    main()
