"""Benchmark: RL rollout steps per second and update time per group on this machine.

Uses the stage-1 demo model (runs/demo/final, from `make demo`) on the demo's training episodes;
prints numbers, asserts nothing. Run with `make bench` or `python tests/bench/bench_rl.py [checkpoint]`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from streamvln.agent.rollout import rollout  # noqa: E402
from streamvln.rl.config import load_rl_config  # noqa: E402
from streamvln.rl.policy import Member, RLPolicy  # noqa: E402
from streamvln.rl.train import load_policy_model  # noqa: E402
from streamvln.rl.update import TorchStep, update_policy  # noqa: E402
from streamvln.sim.base import SimConfig  # noqa: E402
from streamvln.sim.episodes import read_episodes  # noqa: E402
from streamvln.sim.miniworld_sim import MiniWorldSim  # noqa: E402


def update_forwards():
    """The update's time per group with the guide's random minibatches (one forward per decision) and with
    window_minibatches (one forward per window), on the same rollouts: the tiny model (configs/model/tiny.yaml,
    random weights, a head that walks) over the reference's 32-step windows, so needs no `make demo`."""
    import tempfile
    from dataclasses import replace

    import yaml

    from pipeline.qwen_tokenizer import load_tokenizer
    from streamvln.model.config import StreamVLNConfig
    from streamvln.model.modeling import StreamVLNForCausalLM
    from streamvln.sim.episodes import EpisodeGenConfig, generate_episodes

    torch.manual_seed(0)
    keys = yaml.safe_load((ROOT / "configs/model/tiny.yaml").read_text())
    model = StreamVLNForCausalLM(StreamVLNConfig(**{**keys, "initializer_range": 0.1}))
    model.set_output_vocab([76286, 71858, 51018, 151645])  # moves and <|im_end|>: answers of a few moves
    ckpt = Path(tempfile.mkdtemp(prefix="bench_rl_")) / "ckpt"
    model.save_pretrained(ckpt)
    load_tokenizer(ROOT / "build" / "qwen2_tokenizer").save_pretrained(ckpt)
    episodes, _ = generate_episodes(EpisodeGenConfig(tier="room", scenes=2, per_scene=1, seed=5))
    cfg = load_rl_config(None, num_envs=4, group_size=2, num_episodes_per_update=2, tensorboard=False,
                         enable_recovery=False, max_steps_per_episode=96, mini_batch_size=2, lora=None)
    agent = load_policy_model(str(ckpt), cfg)
    agent.cfg.max_new_tokens = 5
    sims = [MiniWorldSim(SimConfig(width=224, height=168, max_steps=96)) for _ in range(4)]
    try:
        policy = RLPolicy(agent, sims, cfg)
        trajectories = [r.info for r in rollout(sims, policy, [Member(ep, m, 0, cfg.seed) for ep in episodes
                                                               for m in range(2)])]
    finally:
        for s in sims:
            s.close()
    state = {k: v.clone() for k, v in agent.model.state_dict().items()}
    print("update time per group, the same rollouts (2 groups of 2, 96 steps, the tiny model):")
    for label, windows in (("before: random minibatches of 2 decisions", False),
                           ("after: window_minibatches (one forward per window)", True)):
        agent.model.load_state_dict(state)
        params = [p for p in agent.model.parameters() if p.requires_grad]
        step = TorchStep(torch.optim.AdamW(params, lr=1e-4), params, cfg.max_grad_norm)
        stats = update_policy(agent, step, trajectories, replace(cfg, window_minibatches=windows), 0)
        print(f"  {label:52s}: {stats['update_time'] / 2:6.2f} s a group ({stats['policy_decisions']} decisions, "
              f"first ratio {stats['first_ratio']:.3f})")


def main():
    torch.set_num_threads(2)
    update_forwards()
    checkpoint = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "runs" / "demo" / "final")
    episodes_path = ROOT / "data" / "sim" / "episodes" / "train.json.gz"
    if not (Path(checkpoint) / "config.json").exists() or not episodes_path.exists():
        print(f"bench_rl: needs {checkpoint} and {episodes_path} (make demo); skipped")
        return
    torch.set_num_threads(2)
    episodes = read_episodes(episodes_path)[::25][:8]
    print(f"{'envs':>5} {'group':>5} {'episodes':>8} {'env steps':>9} {'rollout s':>9} {'steps/s':>8} "
          f"{'update s':>8} {'update s/group':>14} {'decisions':>9} {'SFT samples':>11}")
    for envs, group in ((4, 2), (8, 4)):
        cfg = load_rl_config(ROOT / "configs" / "rl" / "demo.yaml", num_envs=envs, group_size=group,
                             num_episodes_per_update=2, tensorboard=False)
        agent = load_policy_model(checkpoint, cfg)
        sims = [MiniWorldSim(SimConfig(width=224, height=168)) for _ in range(envs)]
        try:
            policy = RLPolicy(agent, sims, cfg)
            members = [Member(ep, m, 0, cfg.seed) for ep in episodes[:2] for m in range(group)]
            start = time.perf_counter()
            trajectories = [r.info for r in rollout(sims, policy, members)]
            seconds = time.perf_counter() - start
            steps = sum(len(t["steps"]) for t in trajectories)
            params = [p for p in agent.model.parameters() if p.requires_grad]
            step = TorchStep(torch.optim.AdamW(params, lr=cfg.learning_rate), params, cfg.max_grad_norm)
            stats = update_policy(agent, step, trajectories, cfg, 0)
        finally:
            for s in sims:
                s.close()
        print(f"{envs:>5} {group:>5} {2:>8} {steps:>9} {seconds:>9.1f} {steps / seconds:>8.1f} "
              f"{stats['update_time']:>8.1f} {stats['update_time'] / 2:>14.1f} {stats['policy_decisions']:>9} "
              f"{stats['sft_samples']:>11}")
    print(f"(CPU, {torch.get_num_threads()} threads; tiny demo model at 112x112, simulator 224x168; rollouts "
          "include the simulator, the expert's labels and the model's batched decisions)")


if __name__ == "__main__":
    main()
