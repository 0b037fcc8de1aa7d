"""`streamvln-manip libero-synth`: CALVIN-format demonstrations of LIBERO's official tasks by the scripted expert.

Per task, `episodes` (training) and `val_episodes` (validation) episodes, each from a seeded random
placement of the task's scene (LIBERO's own placement regions; the 50 official initial states are kept
for evaluation), the expert acting until LIBERO's success predicate holds or the suite's step limit.
Frames are the tabletop synth's (episode_XXXXXXX.npz, frame id = episode x 1000 + step, written with a
fixed zip timestamp); a solved episode is one language span with LIBERO's official instruction and the
task's name as its task. A task the expert cannot do (its goal is not one In/On predicate) and an
episode it did not finish are counted with their reasons; the unfinished episode's frames stay as
unannotated play. Re-running finishes an interrupted run.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.shard_writer import write_json_atomic

from .libero import MAX_STEPS, LiberoConfig, LiberoEnv, LiberoTask, package_version, select_tasks
from .libero_expert import LiberoExpert, UnsupportedGoal
from .synth import FRAMES_PER_EPISODE, finish_split, write_npz


@dataclass
class LiberoSynthConfig:
    suite: str = "libero_object"
    tasks: str = "all"  # 'all', or comma-separated names or indices
    episodes: int = 10  # per task, training
    val_episodes: int = 2  # per task, validation
    seed: int = 0
    camera_size: int = 128  # LIBERO's own
    max_steps: int = 0  # 0: the suite's evaluation limit

    def limit(self) -> int:
        return self.max_steps or MAX_STEPS.get(self.suite, 400)


def run_episode(env: LiberoEnv, folder: Path, episode: int, task: LiberoTask, seed: int,
                cfg: LiberoSynthConfig) -> dict:
    """Simulate one episode from a seeded placement and write its frames; its span, or why there is none."""
    base = episode * FRAMES_PER_EPISODE
    rng = np.random.default_rng([seed, episode])
    obs = env.reset(task, None, seed=int(rng.integers(2**31)))
    record = {"episode": episode, "task": task.name, "spans": [], "failures": []}
    try:
        expert = LiberoExpert(env)
    except UnsupportedGoal as e:
        return {**record, "frames": None, "failures": [{"episode": episode, "task": task.name, "reason": str(e)}]}
    step = 0
    while step < cfg.limit():
        action = expert.act()
        absolute = env.step(action)
        write_npz(folder / f"episode_{base + step:07d}.npz", {**obs, "actions": absolute, "rel_actions": action})
        step += 1
        obs = env.observe()
        if env.success():
            record["spans"].append({"start": base, "end": base + step - 1, "task": task.name, "ann": task.language})
            break
    else:
        record["failures"].append({"episode": episode, "task": task.name,
                                   "reason": f"expert did not finish in {cfg.limit()} steps"})
    return {**record, "frames": [base, base + step - 1]}


_worker: dict = {}


def _init(cfg: LiberoSynthConfig):
    _worker["env"] = LiberoEnv(LiberoConfig(cfg.camera_size))
    _worker["cfg"] = cfg
    _worker["tasks"] = {t.name: t for t in select_tasks(cfg.suite, cfg.tasks)}


def _job(job: tuple[str, int, str, int]) -> dict:
    folder, episode, task, seed = job
    record = run_episode(_worker["env"], Path(folder), episode, _worker["tasks"][task], seed, _worker["cfg"])
    write_json_atomic(Path(folder) / ".done" / f"{episode:06d}.json", record)
    return record


def synthesize(out: str | Path, cfg: LiberoSynthConfig, workers: int = 1, progress: bool = True) -> dict:
    """Write <out>/training and <out>/validation (or finish writing them); a summary, also saved as synth.json."""
    out = Path(out)
    tasks = select_tasks(cfg.suite, cfg.tasks)  # fails early, with the suite's task names, on a bad --tasks
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "synth_config.json"
    settings = {**asdict(cfg), "task_names": [t.name for t in tasks], "libero": package_version()}
    if config_path.exists() and json.loads(config_path.read_text()) != settings:
        raise ValueError(f"{out} was started with other options ({config_path}); use another --out")
    write_json_atomic(config_path, settings)
    splits = {"training": (cfg.episodes, cfg.seed), "validation": (cfg.val_episodes, cfg.seed + 10_000)}
    jobs = []
    for split, (per_task, seed) in splits.items():
        (out / split / ".done").mkdir(parents=True, exist_ok=True)
        for k, task in enumerate(tasks):  # task-major: consecutive jobs share a scene, so workers rarely rebuild
            for e in range(k * per_task, (k + 1) * per_task):
                if not (out / split / ".done" / f"{e:06d}.json").exists():
                    jobs.append((str(out / split), e, task.name, seed))
    if workers <= 1:
        _init(cfg)
        results = map(_job, jobs)
    else:
        pool = mp.get_context("fork").Pool(workers, _init, (cfg,))
        results = pool.imap_unordered(_job, jobs, chunksize=max(1, cfg.episodes // workers))
    try:
        for i, _ in enumerate(results):
            if progress and (i + 1) % 10 == 0:
                print(f"  {i + 1}/{len(jobs)} episodes", flush=True)
    finally:
        if workers > 1:
            pool.close()
            pool.join()
        else:
            _worker["env"].close()
    summary = {"config": settings,
               **{split: finish_split(out / split, n * len(tasks)) for split, (n, _) in splits.items()}}
    write_json_atomic(out / "synth.json", summary, indent=1)
    return {**summary, "written_now": len(jobs)}
