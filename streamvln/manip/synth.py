"""`streamvln-manip synth`: CALVIN-format demonstrations from the pybullet tabletop and its scripted expert.

Each episode starts from a seeded scene of the chosen rung (tasks.RUNGS: its blocks and tasks) and runs
a chain of 1..max_tasks feasible tasks with the expert, one after the other without a reset (CALVIN's
play data is continuous too). Every control step is one
frame file `episode_XXXXXXX.npz` (rgb_static, rgb_gripper, robot_obs, scene_obs, actions,
rel_actions); every task the expert completed is one language span (start, end inclusive) with a
paraphrased instruction in `lang_annotations/auto_lang_ann.npy`. Frame ids are episode x 1000 + step,
so episodes are written independently (workers, resume) and ids never depend on other episodes.

A task the expert did not complete gets no span and ends its episode's chain (its frames stay, as
unannotated play data); it is counted with its reason. Re-running finishes an interrupted run: an
episode is done once its marker is written, after its frames.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.shard_writer import write_json_atomic

from .expert import Expert
from .tabletop import Tabletop, TabletopConfig
from .tasks import PARAPHRASES, get_rung, instruction, parse_task, sample_chain, succeeded

MAX_TASK_STEPS = 200
FRAMES_PER_EPISODE = 1000  # frame id = episode x 1000 + step


@dataclass
class SynthConfig:
    episodes: int = 200  # training episodes
    val_episodes: int = 20
    seed: int = 0
    max_tasks: int = 3  # tasks per episode: 1..max_tasks
    static_size: int = 128
    gripper_size: int = 84
    rung: str = "full"  # tasks.RUNGS: one-block, named-block, full
    # DART-style noise (std, in relative-action units) added to the executed arm motion while the gripper is open
    # (approaches); the frame's label stays the expert's own action, so the data shows corrections from where
    # the noise led, which a policy's own errors lead to in closed loop. 0: the expert's actions as they are.
    action_noise: float = 0.0

    def __post_init__(self):
        rung = get_rung(self.rung)
        if not 0.0 <= self.action_noise <= 1.0:
            raise ValueError(f"action_noise must be in [0, 1] (relative-action units), got {self.action_noise}")
        if not 1 <= self.max_tasks <= rung.max_tasks:
            raise ValueError(f"max_tasks must be 1..{rung.max_tasks} on rung {self.rung!r}, got {self.max_tasks}")


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez's layout with a fixed timestamp (np.savez stamps the time: outputs would differ run to run),
    written to a temporary name and renamed."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            data = io.BytesIO()
            np.lib.format.write_array(data, np.ascontiguousarray(array), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), data.getvalue(),
                        compress_type=zipfile.ZIP_DEFLATED)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def run_episode(env: Tabletop, folder: Path, episode: int, seed: int, cfg: SynthConfig) -> dict:
    """Simulate one episode, write its frames; its spans and what failed."""
    rng = np.random.default_rng([seed, episode])
    obs = env.reset(int(rng.integers(2**31)))
    chain = sample_chain(obs["scene_obs"], rng, int(rng.integers(1, cfg.max_tasks + 1)), list(get_rung(cfg.rung).tasks))
    noise = np.random.default_rng([seed, episode, 1])  # its own stream: without noise the output is unchanged
    step, spans, failures = 0, [], []
    for task in chain:
        expert, start, start_scene = Expert(task, env, rng), step, obs["scene_obs"]
        for _ in range(MAX_TASK_STEPS):
            action = expert.act()
            executed = action.copy()
            if cfg.action_noise and action[6] > 0:
                executed[:3] += noise.normal(0.0, cfg.action_noise, 3).astype(np.float32)
            absolute = env.step(executed)
            write_npz(folder / f"episode_{episode * FRAMES_PER_EPISODE + step:07d}.npz",
                      {**obs, "actions": absolute, "rel_actions": action})
            step += 1
            obs = env.observe()
            if succeeded(task, start_scene, obs["scene_obs"], obs["robot_obs"]):
                break
        else:
            failures.append({"episode": episode, "task": task, "reason": f"expert did not finish in {MAX_TASK_STEPS} steps"})
            break
        kind, _ = parse_task(task)
        text = instruction(task, int(rng.integers(len(PARAPHRASES[kind]))))
        spans.append({"start": episode * FRAMES_PER_EPISODE + start, "end": episode * FRAMES_PER_EPISODE + step - 1,
                      "task": task, "ann": text})
    if step >= FRAMES_PER_EPISODE:
        raise RuntimeError(f"episode {episode} has {step} frames, more than {FRAMES_PER_EPISODE}")
    return {"episode": episode, "frames": [episode * FRAMES_PER_EPISODE, episode * FRAMES_PER_EPISODE + step - 1],
            "chain": chain, "spans": spans, "failures": failures}


_worker: dict = {}


def _init(cfg: SynthConfig):
    _worker["env"] = Tabletop(TabletopConfig(cfg.static_size, cfg.gripper_size, get_rung(cfg.rung).blocks))
    _worker["cfg"] = cfg


def _job(job: tuple[str, int, int]) -> dict:
    folder, episode, seed = job
    done = Path(folder) / ".done" / f"{episode:06d}.json"
    record = run_episode(_worker["env"], Path(folder), episode, seed, _worker["cfg"])
    write_json_atomic(done, record)
    return record


def finish_split(folder: Path, n: int) -> dict:
    """Merge the episodes' markers into CALVIN's annotation and episode files."""
    records = [json.loads((folder / ".done" / f"{e:06d}.json").read_text()) for e in range(n)]
    spans = [s for r in records for s in r["spans"]]
    ann = {"info": {"indx": [(s["start"], s["end"]) for s in spans], "episodes": []},
           "language": {"ann": [s["ann"] for s in spans], "task": [s["task"] for s in spans], "emb": []}}
    (folder / "lang_annotations").mkdir(exist_ok=True)
    # CALVIN's own format is a pickled dict (read back by pipeline/safe_pickle.py's restricted unpickler)
    tmp = folder / "lang_annotations" / "auto_lang_ann.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, np.array(ann, dtype=object), allow_pickle=True)
    tmp.replace(folder / "lang_annotations" / "auto_lang_ann.npy")
    with open(folder / "ep_start_end_ids.npy.tmp", "wb") as f:
        np.save(f, np.array([r["frames"] for r in records if r["frames"]], dtype=np.int64).reshape(-1, 2))
    (folder / "ep_start_end_ids.npy.tmp").replace(folder / "ep_start_end_ids.npy")
    failures = [f for r in records for f in r["failures"]]
    tasks_run = sum(len(r["spans"]) + len(r["failures"]) for r in records)
    # an episode that never ran (LIBERO: a task the expert cannot do) has frames None
    return {"episodes": n, "frames": sum(r["frames"][1] - r["frames"][0] + 1 for r in records if r["frames"]),
            "tasks_attempted": tasks_run, "spans": len(spans), "expert_failures": failures,
            "per_task": {t: sum(s["task"] == t for s in spans) for t in sorted({s["task"] for s in spans})}}


def synthesize(out: str | Path, cfg: SynthConfig, workers: int = 1, progress: bool = True) -> dict:
    """Write <out>/training and <out>/validation (or finish writing them); a summary, also saved as synth.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "synth_config.json"
    if config_path.exists() and json.loads(config_path.read_text()) != asdict(cfg):
        raise ValueError(f"{out} was started with other options ({config_path}); use another --out")
    write_json_atomic(config_path, asdict(cfg))
    splits = {"training": (cfg.episodes, cfg.seed), "validation": (cfg.val_episodes, cfg.seed + 10_000)}
    jobs = []
    for split, (n, seed) in splits.items():
        (out / split / ".done").mkdir(parents=True, exist_ok=True)
        jobs += [(str(out / split), e, seed) for e in range(n) if not (out / split / ".done" / f"{e:06d}.json").exists()]
    if workers <= 1:
        _init(cfg)
        for i, job in enumerate(jobs):
            _job(job)
            if progress and (i + 1) % 20 == 0:
                print(f"  {i + 1}/{len(jobs)} episodes", flush=True)
    else:
        with mp.get_context("fork").Pool(workers, _init, (cfg,)) as pool:
            for i, _ in enumerate(pool.imap_unordered(_job, jobs)):
                if progress and (i + 1) % 20 == 0:
                    print(f"  {i + 1}/{len(jobs)} episodes", flush=True)
    summary = {"config": asdict(cfg), **{split: finish_split(out / split, n) for split, (n, _) in splits.items()}}
    write_json_atomic(out / "synth.json", summary, indent=1)  # the same however many runs it took
    return {**summary, "written_now": len(jobs)}
