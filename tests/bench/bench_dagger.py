"""DAgger collection benchmark: env steps/s and episodes/min of the mixed policy for N batched environments."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline.qwen_tokenizer import load_tokenizer
from streamvln.agent.rollout import rollout
from streamvln.agent.streaming import AgentConfig, StreamingAgent
from streamvln.dagger.policy import DaggerConfig, DaggerPolicy
from streamvln.model.build import build_model
from streamvln.sim.base import SimConfig
from streamvln.sim.episodes import read_episodes
from streamvln.sim.miniworld_sim import MiniWorldSim

ROOT = Path(__file__).resolve().parents[2]


def main():
    """The demo's stage-1 model and 12 of the demo's training episodes at 224x168, the reference's rules (beta 0)."""
    torch.set_num_threads(2)
    ckpt, episodes = ROOT / "runs" / "demo" / "final", ROOT / "data" / "sim" / "episodes" / "train.json.gz"
    if not (ckpt / "config.json").exists() or not episodes.exists():
        print("dagger: skipped, no runs/demo/final or data/sim (make demo makes them)")
        return
    model = build_model(None, str(ckpt)).eval()
    tok = load_tokenizer(ckpt)
    eps = read_episodes(episodes)[::40]
    for n in (1, 4):
        sims = [MiniWorldSim(SimConfig(width=224, height=168)) for _ in range(n)]
        agent = StreamingAgent(model, tok, AgentConfig(image_size=112), num_envs=n)
        t = time.perf_counter()
        results = list(rollout(sims, DaggerPolicy(agent, sims, DaggerConfig()), eps, keep_frames=True))
        dt = time.perf_counter() - t
        steps = sum(r.metrics["steps"] for r in results)
        model_steps = sum(r.info["model_steps"] for r in results)
        print(f"dagger N={n}: {steps / dt:.1f} env steps/s, {len(results) / dt * 60:.1f} episodes/min "
              f"({len(results)} episodes, {steps} steps, {model_steps} by the model, {agent.decisions} decisions; "
              "render included, frames not written)")
        for sim in sims:
            sim.close()


if __name__ == "__main__":
    main()
