"""Tabletop tasks: names, instructions with paraphrases, success checks, feasibility, 5-task chains and the rungs.

Success is judged as CALVIN's task oracle does: from the state when the subtask started and the state
now (scene_obs / robot_obs layouts of tabletop.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tabletop import BLOCK_HALF, COLORS, TRAY_HALF, TRAY_SLOTS, TRAY_XY

KINDS = ("lift", "place", "push_left", "push_right")
LIFT_HEIGHT = 0.05  # metres above where it started
PUSH_DISTANCE = 0.05  # metres sideways, staying on the table
PARAPHRASES = {
    "lift": ["lift the {c} block", "pick up the {c} block", "grasp the {c} block and lift it", "raise the {c} block"],
    "place": ["place the {c} block in the tray", "put the {c} block into the tray", "move the {c} block to the tray",
              "store the {c} block in the tray"],
    "push_left": ["push the {c} block to the left", "slide the {c} block left", "nudge the {c} block to the left",
                  "move the {c} block left by pushing it"],
    "push_right": ["push the {c} block to the right", "slide the {c} block right", "nudge the {c} block to the right",
                   "move the {c} block right by pushing it"],
}
TASKS = [f"{k}_{c}_block" if k == "lift" else
         f"place_{c}_block_in_tray" if k == "place" else f"push_{c}_block_{k.split('_')[1]}"
         for k in KINDS for c in COLORS]


def parse_task(task: str) -> tuple[str, str]:
    """'push_red_block_left' -> ('push_left', 'red')."""
    parts = task.split("_")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    kind = "push_" + parts[-1] if parts[0] == "push" else parts[0]
    return kind, parts[1]


def instruction(task: str, variant: int = 0) -> str:
    """Variant 0 is the evaluation instruction (CALVIN's first annotation); others are paraphrases."""
    kind, color = parse_task(task)
    options = PARAPHRASES[kind]
    return options[variant % len(options)].format(c=color)


def block_pos(scene_obs: np.ndarray, color: str) -> np.ndarray:
    i = list(COLORS).index(color)
    return np.asarray(scene_obs[6 + 6 * i : 9 + 6 * i], dtype=np.float64)


def in_tray(pos: np.ndarray) -> bool:
    return bool(abs(pos[0] - TRAY_XY[0]) < TRAY_HALF and abs(pos[1] - TRAY_XY[1]) < TRAY_HALF and pos[2] < 0.06)


def on_table(pos: np.ndarray) -> bool:
    return bool(pos[2] < BLOCK_HALF + 0.01 and not in_tray(pos))


def succeeded(task: str, start_scene: np.ndarray, scene: np.ndarray, robot_obs: np.ndarray) -> bool:
    kind, color = parse_task(task)
    before, now = block_pos(start_scene, color), block_pos(scene, color)
    if kind == "lift":
        return bool(now[2] - before[2] > LIFT_HEIGHT)
    if kind == "place":
        return in_tray(now) and not in_tray(before) and robot_obs[-1] > 0  # released (gripper open)
    sign = 1.0 if kind == "push_left" else -1.0  # left is +y, from the robot's side of the table
    return bool(on_table(now) and sign * (now[1] - before[1]) > PUSH_DISTANCE)


def feasible(task: str, scene: np.ndarray) -> bool:
    """Whether the task can be done from this state: a held block can only be placed; a push needs
    room on the table (off the tray) and no other block in its path."""
    kind, color = parse_task(task)
    pos = block_pos(scene, color)
    held = [c for c in COLORS if block_pos(scene, c)[2] > BLOCK_HALF + 0.02 and not in_tray(block_pos(scene, c))]
    if held:
        return kind == "place" and held == [color]
    if not on_table(pos):
        return False
    if kind in ("lift", "place"):
        return True
    sign = 1.0 if kind == "push_left" else -1.0
    end_y = pos[1] + sign * 0.09
    if not -0.24 < end_y < 0.14:  # stays off the tray and within reach
        return False
    lo, hi = sorted((pos[1] - sign * 0.07, end_y + sign * 0.03))
    for other in COLORS:
        o = block_pos(scene, other)
        if other != color and abs(o[0] - pos[0]) < 0.06 and lo < o[1] < hi:
            return False
    return True


def predict_scene(task: str, scene: np.ndarray) -> np.ndarray:
    """The state after the task, symbolically (for planning chains before running them)."""
    kind, color = parse_task(task)
    i = 6 + 6 * list(COLORS).index(color)
    out = np.array(scene, dtype=np.float64)
    if kind == "lift":
        out[i + 2] += 0.10
    elif kind == "place":
        slot = TRAY_SLOTS[color]
        out[i : i + 3] = [TRAY_XY[0] + slot[0], TRAY_XY[1] + slot[1], BLOCK_HALF + 0.005]
    else:
        out[i + 1] += 0.085 if kind == "push_left" else -0.085
    return out


def sample_chain(scene: np.ndarray, rng: np.random.Generator, length: int = 5, tasks: list[str] | None = None) -> list[str]:
    """Up to `length` tasks, each feasible after the ones before (symbolically), no task twice in a row."""
    chain: list[str] = []
    for _ in range(length):
        options = [t for t in (tasks or TASKS) if feasible(t, scene) and (not chain or t != chain[-1])]
        if not options:
            break
        chain.append(options[int(rng.integers(len(options)))])
        scene = predict_scene(chain[-1], scene)
    return chain


@dataclass(frozen=True)
class Rung:
    """One rung of the tabletop ladder: which blocks the scene holds, which tasks are asked, how many in a row."""

    name: str
    blocks: tuple[str, ...]
    tasks: tuple[str, ...]
    max_tasks: int  # the longest chain of tasks an episode runs (1: one task per episode, and no 5-task chains)
    about: str


RUNGS = {r.name: r for r in (
    Rung("one-block", ("red",), ("lift_red_block",), 1,
         "one red block at a random place and yaw; one task: lift it"),
    Rung("named-block", tuple(COLORS), tuple(f"lift_{c}_block" for c in COLORS), 1,
         "three blocks; lift the one the instruction names"),
    Rung("full", tuple(COLORS), tuple(TASKS), 5,
         "three blocks and a tray; the 12 tasks, chained (synth: 1..max-tasks; eval: 5-task chains)"),
)}


def get_rung(name: str) -> Rung:
    if name not in RUNGS:
        raise ValueError(f"unknown rung {name!r}; known: {', '.join(RUNGS)}")
    return RUNGS[name]
