"""LIBERO's official tasks and initial states behind closed_loop.run_chains (the interface TabletopSim gives).

Its own module so that the dependency runs one way: libero_expert uses libero's env, and this module uses both.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from .closed_loop import Chain
from .libero import MAX_STEPS, LiberoConfig, LiberoEnv, init_states, package_version, suite_tasks
from .libero_expert import LiberoExpert


class LiberoSim:
    """LIBERO for closed_loop.run_chains: one official initial state per chain of one task (Chain.seed = its index)."""

    name = "libero"

    def __init__(self, suite: str, cfg: LiberoConfig | None = None):
        self.suite, self.cfg = suite, cfg or LiberoConfig()
        self.tasks = {t.name: t for t in suite_tasks(suite)}
        self._states: dict[str, np.ndarray] = {}

    def default_max_steps(self) -> int:
        return MAX_STEPS.get(self.suite, 400)

    def make_chains(self, mode: str, tasks: list[str], episodes: int, seed: int) -> list[Chain]:
        """Per task the first `episodes` official initial states (LIBERO has no chains of tasks)."""
        if mode != "tasks":
            raise ValueError("LIBERO has no chains of tasks (its libero_10 tasks are the long ones): use --chains 0")
        if episodes > 50:
            raise ValueError("LIBERO has 50 official initial states per task")
        return [Chain(k, e, [t]) for k, (t, e) in enumerate((t, e) for t in tasks for e in range(episodes))]

    def make_env(self) -> LiberoEnv:
        return LiberoEnv(self.cfg)

    def start(self, env: LiberoEnv, chain: Chain, render: bool) -> dict:
        task = self.tasks[chain.tasks[0]]
        if task.name not in self._states:
            self._states[task.name] = init_states(task)
        return env.reset(task, self._states[task.name][chain.seed], render=render)

    def instruction(self, task: str) -> str:
        return self.tasks[task].language

    def succeeded(self, env: LiberoEnv, task: str, start: dict, obs: dict) -> bool:
        return env.success()

    def make_expert(self, task: str, env: LiberoEnv):
        return LiberoExpert(env)

    def config(self) -> dict:
        return {"sim": self.name, "suite": self.suite, "libero": package_version(), **asdict(self.cfg)}
