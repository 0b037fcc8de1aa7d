"""Closed-loop evaluation (the tabletop, or LIBERO): success per task and CALVIN's chains of up to 5 subtasks; resumable.

As CALVIN's evaluate_policy: a chain's subtasks run in order from its initial state, each with its
evaluation instruction and a fresh policy history, for at most `max_steps` steps; the chain stops at
the first failure. Success rate for length i = the share of chains with at least i subtasks done;
average length = mean subtasks done. Per-task evaluation is chains of one task each. Environments
run in lockstep, the policy called once per step for all of them. Each finished chain is appended
to results.jsonl at once, so a killed run continues where it stopped.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.shard_writer import write_json_atomic

from .expert import Expert
from .tabletop import Tabletop, TabletopConfig
from .tasks import feasible, instruction, sample_chain, succeeded

CHAIN_LENGTH = 5


@dataclass
class Chain:
    id: int
    seed: int  # the tabletop's reset seed; in LIBERO the index of the official initial state
    tasks: list[str]


class TabletopSim:
    """The pybullet tabletop behind run_chains: how a chain starts, its instructions, success, expert and plans.

    LiberoSim (libero_sim.py) has the same methods, so one rollout loop serves both simulators."""

    name = "tabletop"

    def __init__(self, cfg: TabletopConfig | None = None):
        self.cfg = cfg or TabletopConfig()

    def default_max_steps(self) -> int:
        return 240

    def make_env(self) -> Tabletop:
        return Tabletop(self.cfg)

    def start(self, env: Tabletop, chain: Chain, render: bool) -> dict:
        return env.reset(chain.seed, render=render)

    def instruction(self, task: str) -> str:
        return instruction(task)

    def succeeded(self, env: Tabletop, task: str, start: dict, obs: dict) -> bool:
        return succeeded(task, start["scene_obs"], obs["scene_obs"], obs["robot_obs"])

    def make_expert(self, task: str, env: Tabletop) -> Expert:
        return Expert(task, env)

    def make_chains(self, mode: str, tasks: list[str], episodes: int, seed: int) -> list[Chain]:
        """mode tasks: `episodes` initial states per task in which it is feasible; chains: `episodes` chains of
        up to 5 feasible tasks (drawn from `tasks`) from seeded initial states."""
        env = self.make_env()
        try:
            return make_chains(mode, tasks, episodes, seed, env)
        finally:
            env.close()

    def config(self) -> dict:
        return {"sim": self.name, **asdict(self.cfg)}


def make_chains(mode: str, tasks: list[str], episodes: int, seed: int, env: Tabletop) -> list[Chain]:
    """mode tasks: `episodes` initial states per task in which it is feasible; chains: `episodes` chains of up
    to 5 feasible tasks (drawn from `tasks`) from seeded initial states."""
    rng = np.random.default_rng(seed)
    chains: list[Chain] = []
    if mode == "tasks":
        for task in tasks:
            found = 0
            while found < episodes:
                s = int(rng.integers(2**31))
                if feasible(task, env.reset(s, render=False)["scene_obs"]):
                    chains.append(Chain(len(chains), s, [task]))
                    found += 1
    else:
        while len(chains) < episodes:
            s = int(rng.integers(2**31))
            chain = sample_chain(env.reset(s, render=False)["scene_obs"], rng, CHAIN_LENGTH, tasks)
            if len(chain) == CHAIN_LENGTH:  # CALVIN's chains are always 5 long
                chains.append(Chain(len(chains), s, chain))
    return chains


def read_results(path: Path) -> dict[int, dict]:
    """Finished chains; a line cut short by a kill is dropped (and the file trimmed to the last whole line)."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(whole))
    return {r["chain"]: r for r in map(json.loads, whole.decode().splitlines())}


def run_chains(policy, chains: list[Chain], results_path: Path, *, sim=None, num_envs: int = 4,
               max_steps: int | None = None, progress: bool = True) -> list[dict]:
    """Run the chains not yet in results_path in `sim` (the tabletop by default); every chain's result, in order."""
    sim = sim or TabletopSim()
    max_steps = max_steps or sim.default_max_steps()
    results_path.parent.mkdir(parents=True, exist_ok=True)
    done = read_results(results_path)
    todo = [c for c in chains if c.id not in done]
    envs = [sim.make_env() for _ in range(min(num_envs, len(todo)))]
    render = getattr(policy, "needs_images", True)
    slot: dict[int, dict] = {}
    obs: dict[int, dict] = {}
    queue = list(todo)
    log = open(results_path, "a")

    def start(i: int) -> None:
        chain = queue.pop(0)
        obs[i] = sim.start(envs[i], chain, render)
        slot[i] = {"chain": chain, "k": 0, "steps": 0, "start": obs[i], "lengths": []}
        policy.reset(i, chain.tasks[0], sim.instruction(chain.tasks[0]))

    def finish(i: int) -> None:
        s = slot.pop(i)
        c = s["chain"]
        record = {"chain": c.id, "seed": c.seed, "tasks": c.tasks, "completed": s["k"], "steps": s["lengths"]}
        log.write(json.dumps(record) + "\n")
        log.flush()
        os.fsync(log.fileno())
        done[c.id] = record
        if progress and len(done) % 10 == 0:
            print(f"  {len(done)}/{len(chains)} chains", flush=True)
        if queue:
            start(i)

    try:
        for i in range(len(envs)):
            start(i)
        while slot:
            active = sorted(slot)
            actions = policy.act(envs, obs, active)
            for i, action in zip(active, actions):
                envs[i].step(action)
                obs[i] = envs[i].observe(render=render)
                s = slot[i]
                s["steps"] += 1
                task = s["chain"].tasks[s["k"]]
                if sim.succeeded(envs[i], task, s["start"], obs[i]):
                    s["lengths"].append(s["steps"])
                    s["k"] += 1
                    if s["k"] == len(s["chain"].tasks):
                        finish(i)
                    else:  # the next subtask starts from here, with a fresh history
                        s["steps"], s["start"] = 0, obs[i]
                        policy.reset(i, s["chain"].tasks[s["k"]], sim.instruction(s["chain"].tasks[s["k"]]))
                elif s["steps"] >= max_steps:
                    finish(i)
    finally:
        log.close()
        for env in envs:
            env.close()
    return [done[c.id] for c in chains]


def summarize(results: list[dict], mode: str) -> dict:
    """Per-task success over every subtask attempted; for chains, success rate per length and average length."""
    tried, won = Counter(), Counter()  # Counters keep the order tasks first appear in
    for r in results:
        for k, task in enumerate(r["tasks"]):
            if k > r["completed"]:
                break
            tried[task] += 1
            won[task] += k < r["completed"]
    out = {"chains": len(results), "per_task": {t: {"success": won[t] / tried[t], "attempts": tried[t]}
                                                for t in tried}}
    if results:
        out["success_rate"] = sum(won.values()) / max(1, sum(tried.values()))
    if mode == "chains" and results:
        out["chain_success"] = {str(i): sum(r["completed"] >= i for r in results) / len(results)
                                for i in range(1, CHAIN_LENGTH + 1)}
        out["average_length"] = float(np.mean([r["completed"] for r in results]))
    return out


def evaluate(policy, out_dir: str | Path, *, tasks: list[str], episodes: int, chains: int, seed: int = 0,
             sim=None, num_envs: int = 4, max_steps: int | None = None, progress: bool = True,
             config: dict | None = None) -> dict:
    """Per-task evaluation (`episodes` per task) and `chains` 5-task chains in `sim` (the tabletop by default);
    summary.json in out_dir."""
    sim = sim or TabletopSim()
    max_steps = max_steps or sim.default_max_steps()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plans = {}
    if episodes:
        plans["tasks"] = sim.make_chains("tasks", tasks, episodes, seed)
    if chains:
        plans["chains"] = sim.make_chains("chains", tasks, chains, seed + 1)
    settings = {**(config or {}), "tasks": tasks, "episodes": episodes, "chains": chains, "seed": seed,
                "max_steps": max_steps, "env": sim.config()}
    saved = out_dir / "eval_config.json"
    if saved.exists() and json.loads(saved.read_text()) != json.loads(json.dumps(settings)):
        raise ValueError(f"{out_dir} holds results of another evaluation ({saved}); use another --out")
    write_json_atomic(saved, settings, indent=1)
    summary = {"config": settings}
    for mode, plan in plans.items():
        results = run_chains(policy, plan, out_dir / f"{mode}.jsonl", sim=sim, num_envs=num_envs,
                             max_steps=max_steps, progress=progress)
        summary[mode] = summarize(results, mode)
    write_json_atomic(out_dir / "summary.json", summary, indent=1)
    return summary
