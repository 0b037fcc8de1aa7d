"""Simulator benchmark: observations per second per core, expert trajectory frames per second, grid build time."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LP_NUM_THREADS", "1")  # one llvmpipe thread: numbers are per core

from streamvln.sim.base import FORWARD, LEFT, RIGHT, SimConfig  # noqa: E402
from streamvln.sim.episodes import EpisodeGenConfig, generate_episodes, write_episodes  # noqa: E402
from streamvln.sim.miniworld_sim import MiniWorldSim  # noqa: E402
from streamvln.sim.navgrid import NavGrid  # noqa: E402
from streamvln.sim.trajectories import TrajectoryConfig, write_trajectories  # noqa: E402
from streamvln.sim.world import generate_scene  # noqa: E402


def observations(size: int, episodes, steps: int = 400) -> float:
    with MiniWorldSim(SimConfig(width=size, height=size, max_steps=10**6)) as sim:
        sim.reset(episodes[0])
        pattern = [FORWARD, LEFT, LEFT, FORWARD, RIGHT, RIGHT, RIGHT, FORWARD]
        for a in pattern * 4:  # warm up
            sim.step(a)
        t = time.perf_counter()
        for i in range(steps):
            sim.step(pattern[i % len(pattern)])
        return steps / (time.perf_counter() - t)


def render_only(size: int, episodes, n: int = 400) -> float:
    with MiniWorldSim(SimConfig(width=size, height=size)) as sim:
        sim.reset(episodes[0])
        t = time.perf_counter()
        for _ in range(n):
            sim._env.render_obs()
        return n / (time.perf_counter() - t)


def main():
    scenes = [generate_scene(f"train_{i:04d}") for i in range(10)]
    t = time.perf_counter()
    cells = 0
    for spec in scenes:
        cells += NavGrid(spec).free.size
    grid_s = (time.perf_counter() - t) / len(scenes)
    print(f"occupancy grid build: {grid_s * 1000:.0f} ms per scene ({cells / len(scenes) / 1000:.0f}k cells of 5 cm, "
          f"10 scenes, incl. the shortest-path graph)")

    eps, _ = generate_episodes(EpisodeGenConfig(scenes=8, per_scene=3, seed=0, r2r_per_path=1, rxr_per_path=0))
    for size in (224, 384):
        print(f"observations {size}x{size}: {observations(size, eps):.0f} obs/s per core (step + render + metrics); "
              f"render alone {render_only(size, eps):.0f} frames/s")

    tmp = Path(tempfile.mkdtemp())
    try:
        path = tmp / "train.json.gz"
        write_episodes(path, eps)
        for workers, (w, h) in ((1, (224, 168)), (2, (224, 168)), (1, (640, 480))):
            out = tmp / f"SimR2R_{workers}_{w}"
            t = time.perf_counter()
            m = write_trajectories(path, out, TrajectoryConfig(sim=SimConfig(width=w, height=h), workers=workers))
            dt = time.perf_counter() - t
            print(f"expert trajectories {w}x{h}, {workers} worker(s): {m['frames'] / dt:.0f} frames/s "
                  f"({m['written']} trajectories, {m['frames']} frames, {dt:.1f} s incl. start-up)")
    finally:
        shutil.rmtree(tmp)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
