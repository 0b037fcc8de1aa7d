"""Benchmark: the manipulation tabletop's cost per step and the closed loop's env steps per second with the
VLA model batched over 1, 4 and 8 environments (one model call per step for all of them); with the LIBERO
extra installed, LIBERO's reset and step cost too.

Uses the tiny VLA built from configs/model/tiny_vla.yaml (untrained: speed does not depend on the weights);
prints numbers, asserts nothing. Run with `make bench` or `python tests/bench/bench_manip.py`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.qwen_tokenizer import load_tokenizer  # noqa: E402
from streamvln.manip.closed_loop import Chain, run_chains  # noqa: E402
from streamvln.manip.expert import Expert  # noqa: E402
from streamvln.manip.policy import VLAPolicy  # noqa: E402
from streamvln.manip.tabletop import Tabletop  # noqa: E402
from streamvln.model.build import build_model  # noqa: E402


def main():
    torch.set_num_threads(2)
    env = Tabletop()
    env.reset(0)
    expert = Expert("place_red_block_in_tray", env)
    timings = {"physics + IK": 0.0, "render (128 + 84 px)": 0.0}
    for _ in range(100):
        t = time.perf_counter()
        env.step(expert.act())
        timings["physics + IK"] += time.perf_counter() - t
        t = time.perf_counter()
        env.render()
        timings["render (128 + 84 px)"] += time.perf_counter() - t
    env.close()
    for name, total in timings.items():
        print(f"tabletop {name:22s} {1000 * total / 100:6.1f} ms/step")
    tokenizer = load_tokenizer(ROOT / "build" / "qwen2_tokenizer")
    model = build_model(str(ROOT / "configs" / "model" / "tiny_vla.yaml"), None)
    print(f"{'envs':>5} {'env steps':>9} {'seconds':>8} {'env steps/s':>11} {'model ms/call':>13}")
    for envs in (1, 4, 8):
        policy = VLAPolicy(model, tokenizer, "What action should the robot take to {instruction}?", 112)
        calls = []
        feature = model.step_feature

        def timed(*a, _f=feature):
            t = time.perf_counter()
            out = _f(*a)
            calls.append(time.perf_counter() - t)
            return out

        model.step_feature = timed
        chains = [Chain(i, i, ["lift_red_block"]) for i in range(envs)]
        out = ROOT / "build" / f"bench_manip_{envs}.jsonl"
        out.unlink(missing_ok=True)
        t = time.perf_counter()
        run_chains(policy, chains, out, num_envs=envs, max_steps=40, progress=False)
        seconds = time.perf_counter() - t
        del model.step_feature
        out.unlink()
        print(f"{envs:5d} {envs * 40:9d} {seconds:8.2f} {envs * 40 / seconds:11.1f} {1000 * np.mean(calls):13.1f}")
    bench_libero()


def bench_libero():
    """LIBERO's own cost (MuJoCo physics at 20 Hz control + two 128x128 EGL renders a step), if installed."""
    from streamvln.manip.libero import LiberoEnv, LiberoUnavailable, init_states, suite_tasks

    try:
        task = suite_tasks("libero_object")[0]
    except LiberoUnavailable as e:
        print(f"LIBERO: not measured ({e})")
        return
    from streamvln.manip.libero_expert import LiberoExpert

    env = LiberoEnv()
    t = time.perf_counter()
    env.reset(task, init_states(task)[0])
    first = time.perf_counter() - t
    t = time.perf_counter()
    env.reset(task, init_states(task)[1])
    again = time.perf_counter() - t
    expert = LiberoExpert(env)
    t = time.perf_counter()
    for _ in range(100):
        env.step(expert.act())
    step = (time.perf_counter() - t) / 100
    env.close()
    print(f"LIBERO libero_object: build + reset {first:.2f} s, reset {again:.2f} s (fresh sim + 10 settling steps), "
          f"step {1000 * step:.1f} ms ({1 / step:.1f} steps/s, one env)")


if __name__ == "__main__":
    main()
