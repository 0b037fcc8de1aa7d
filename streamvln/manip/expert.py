"""The scripted expert: a proportional controller on privileged state through each task's waypoints."""

from __future__ import annotations

import numpy as np

from pipeline.calvin import ARM_CLIP

from .tabletop import DOWN, MAX_REL_ORN, MAX_REL_POS, TRAY_SLOTS, TRAY_XY, Tabletop
from .tasks import block_pos, parse_task

OPEN, CLOSE = 1.0, -1.0
POS_TOL = 0.006
PHASE_LIMIT = 70  # steps before a phase gives up and moves on (the task may then fail, as a real controller)
# the expert's relative actions stay within the +-0.65 that RoboVLMs' CALVIN normalisation keeps, so its
# demonstrations are represented exactly (faster, clipped actions would teach a slower policy than shown)
LIMIT = ARM_CLIP


def wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2 * np.pi) - np.pi


class Expert:
    """Waypoints are recomputed each step from the block's current pose, so a disturbed block is followed.

    Phases (target, gripper, how it ends): a TCP low beside a block first rises clear; the grasp is above -> down -> close (8 steps) -> up; place
    carries the held block over the tray, lowers, opens, rises; a push goes behind the block, down,
    through, up. A block already held skips the grasp.
    """

    def __init__(self, task: str, env: Tabletop, rng: np.random.Generator | None = None):
        self.kind, self.color = parse_task(task)
        self.env = env
        # small seeded offsets make demonstrations differ from each other
        self.jitter = (rng.uniform(-0.004, 0.004, 3) if rng is not None else np.zeros(3))
        held = env.block_pose(self.color)[0][2] > 0.045 and env.gripper_action < 0
        grasp = [("above", OPEN), ("down", OPEN), ("close", CLOSE), ("up", CLOSE)]
        if self.kind == "lift":
            self.phases = grasp
        elif self.kind == "place":
            self.phases = ([] if held else grasp) + [("carry", CLOSE), ("lower", CLOSE), ("open", OPEN), ("rise", OPEN)]
        else:
            self.phases = [("behind_above", CLOSE), ("behind", CLOSE), ("push", CLOSE), ("retreat", CLOSE)]
        # a subtask may start where the last one ended, next to a block: first rise clear of it
        tcp = env.tcp()[0]
        if tcp[2] < 0.08 and not held:
            self.phases = [("clear", self.phases[0][1])] + self.phases
        self.clear = np.array([tcp[0], tcp[1], 0.10])
        self.sign = 1.0 if self.kind == "push_left" else -1.0
        self.phase, self.count = 0, 0
        self.anchor = None  # the block's position when a push or lift began
        self.done = False

    def _target(self, name: str, tcp: np.ndarray) -> np.ndarray | None:
        block = block_pos(self.env.scene_obs(), self.color) + self.jitter * np.array([1, 1, 0])
        slot = TRAY_SLOTS[self.color]
        tray = np.array([TRAY_XY[0] + slot[0], TRAY_XY[1] + slot[1], 0.0])
        if self.anchor is None:
            self.anchor = block.copy()
        targets = {
            "clear": self.clear, "above": block + [0, 0, 0.10], "down": block + [0, 0, -0.005], "close": None,
            "up": self.anchor + [0, 0, 0.12], "carry": tray + [0, 0, 0.16], "lower": tray + [0, 0, 0.075],
            "open": None, "rise": tray + [0, 0, 0.16],
            "behind_above": self.anchor + [0, -self.sign * 0.065, 0.08],
            "behind": self.anchor + [0, -self.sign * 0.065, 0.012],
            "push": self.anchor + [0, self.sign * 0.065, 0.012],
            "retreat": self.anchor + [0, self.sign * 0.065, 0.10],
        }
        return targets[name]

    def act(self) -> np.ndarray:
        """The next relative action (7,); `done` once the last phase has ended (it then holds still)."""
        tcp, euler = self.env.tcp()
        if self.phase >= len(self.phases):
            self.done = True
            return np.array([0, 0, 0, 0, 0, 0, self.phases[-1][1]], dtype=np.float32)
        name, grip = self.phases[self.phase]
        target = self._target(name, tcp)
        if target is None:  # close / open in place
            finished = self.count >= 8
            move = np.zeros(3)
        else:
            move = target - tcp
            finished = np.linalg.norm(move) < POS_TOL
        turn = wrap(np.array(DOWN) - euler)
        self.count += 1
        if finished or self.count > PHASE_LIMIT:
            self.phase, self.count = self.phase + 1, 0
            if name == "close":
                self.anchor = block_pos(self.env.scene_obs(), self.color)  # lift from where it was grasped
        action = np.concatenate([np.clip(move / MAX_REL_POS, -LIMIT, LIMIT), np.clip(turn / MAX_REL_ORN, -LIMIT, LIMIT),
                                 [grip]])
        return action.astype(np.float32)
