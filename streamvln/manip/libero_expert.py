"""A scripted pick-and-place expert for LIBERO tasks whose goal is one object in or on another (privileged state).

Covers goals `(In obj region)` and `(On obj target)`: libero_object's tasks (9 of 10 solved; the cream
cheese box lying flat is missed) and, in form, libero_spatial's bowl-on-plate tasks (not tuned for bowls,
which need a rim grasp). A proportional controller on the simulator's object poses walks the waypoints
above the object, down to it, close, lift, carry above the target, lower, open, and back up. Actions are
CALVIN-convention (a[6] > 0 opens) in OSC_POSE units, kept within +-0.65 on the arm dimensions so
the shards' CALVIN normalisation (clip +-0.65) keeps them whole. Other goals (open a drawer, turn on the
stove, two-object goals) are refused with the reason, so synth reports them as rejects.
"""

from __future__ import annotations

import numpy as np

from .libero import POS_SCALE, LiberoEnv

LIMIT = 0.65
GAIN = 0.8  # of the distance to the waypoint, in action units (1 = 5 cm)
CARRY = 0.30  # carry height above the table: clears LIBERO's baskets and caddies
ABOVE = 0.10  # approach from this far above the object
OPEN, CLOSE = 1.0, -1.0
MAX_WIDTH = 0.065  # wider than this across the fingers (they open to 8 cm): grasp the rim


class UnsupportedGoal(ValueError):
    pass


def pick_and_place_goal(goal: list[list[str]]) -> tuple[str, str]:
    """(object, target) of a one-predicate In/On goal; UnsupportedGoal otherwise."""
    if len(goal) != 1 or len(goal[0]) != 3 or goal[0][0].lower() not in ("in", "on"):
        raise UnsupportedGoal(f"no scripted expert for goal {goal} (only one In/On predicate)")
    return goal[0][1], goal[0][2]


class LiberoExpert:
    """One task in one LiberoEnv; `act()` returns the next action from the current simulator state."""

    def __init__(self, env: LiberoEnv):
        self.env = env
        self.obj, self.target = pick_and_place_goal(env.goal())
        self.phase, self.t = "above", 0
        # Grip 1 cm above the object's centre, but never deeper than 2.5 cm below its top: a tall bottle is
        # held by its neck, where the hand does not strike its cap. An object wider than the open fingers
        # (a bowl) is held by its rim: the grip moves out along the fingers' closing axis (world y).
        centre = self._pos(self.obj)
        lo, hi = self._extent(self.obj)
        self.grip = np.array([0.0, 0.0, max(centre[2] + 0.01, hi[2] - 0.025) - centre[2]])
        if hi[1] - lo[1] > MAX_WIDTH:
            self.grip[1:] = [hi[1] - 0.012 - centre[1], hi[2] - 0.015 - centre[2]]
        # heights are taken from the table the object stands on (LIBERO's scenes differ: floor-level
        # tables in libero_object, a 0.9 m table in libero_spatial)
        self.carry_z = lo[2] + CARRY

    def _extent(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The world bounding box (low, high corners) of the object's collision geoms, from MuJoCo's boxes."""
        import mujoco

        m, d = self.env.env.sim.model._model, self.env.env.sim.data._data
        lows, highs = [], []
        for g in range(m.ngeom):
            body = mujoco.mj_id2name(m, mujoco.mjtObj.mjOBJ_BODY, int(m.geom_bodyid[g])) or ""
            if body.startswith(name) and m.geom_contype[g]:
                rot = d.geom_xmat[g].reshape(3, 3)
                centre, half = d.geom_xpos[g] + rot @ m.geom_aabb[g][:3], np.abs(rot) @ m.geom_aabb[g][3:]
                lows.append(centre - half)
                highs.append(centre + half)
        if not lows:  # no geoms found under that name: a 5 cm box around its position
            pos = self._pos(name)
            return pos - 0.025, pos + 0.025
        return np.min(lows, axis=0), np.max(highs, axis=0)

    def _pos(self, name: str) -> np.ndarray:
        """An object's position, or a region's (a site of the scene's model) with its parent object's."""
        raw = self.env.raw
        if f"{name}_pos" in raw:
            return np.asarray(raw[f"{name}_pos"], dtype=np.float64)
        for suffix in ("_contain_region", "_top_region", "_region"):
            base = name[: -len(suffix)] if name.endswith(suffix) else None
            if base and f"{base}_pos" in raw:
                return np.asarray(raw[f"{base}_pos"], dtype=np.float64)
        sim = self.env.env.sim
        return np.array(sim.data.get_site_xpos(name), dtype=np.float64)

    def _move(self, target: np.ndarray, grip: float) -> tuple[np.ndarray, float]:
        error = target - np.asarray(self.env.raw["robot0_eef_pos"], dtype=np.float64)
        arm = np.clip(error / POS_SCALE * GAIN, -LIMIT, LIMIT)
        return np.array([*arm, 0, 0, 0, grip], dtype=np.float32), float(np.linalg.norm(error))

    def _next(self, phase: str) -> None:
        self.phase, self.t = phase, 0

    def act(self) -> np.ndarray:
        obj, target = self._pos(self.obj), self._pos(self.target)
        eef = np.asarray(self.env.raw["robot0_eef_pos"], dtype=np.float64)
        self.t += 1
        if self.phase == "above":
            action, err = self._move(obj + self.grip * [1, 1, 0] + [0, 0, ABOVE], OPEN)
            if err < 0.015 or self.t > 60:
                self._next("descend")
        elif self.phase == "descend":
            action, err = self._move(obj + self.grip, OPEN)
            if err < 0.01 or self.t > 30:
                self._next("grasp")
        elif self.phase == "grasp":  # close in place; the fingers take ~10 steps
            action, _ = self._move(eef, CLOSE)
            if self.t > 10:
                self._next("lift")
        elif self.phase == "lift":
            action, _ = self._move(np.r_[eef[:2], self.carry_z], CLOSE)
            if eef[2] > self.carry_z - 0.05:
                self._next("carry")
        elif self.phase == "carry":
            action, err = self._move(np.r_[target[:2] + self.grip[:2], self.carry_z], CLOSE)
            if err < 0.02 or self.t > 80:
                self._next("lower")
        elif self.phase == "lower":
            action, err = self._move(np.r_[target[:2] + self.grip[:2], target[2] + 0.15], CLOSE)
            if err < 0.02 or self.t > 40:
                self._next("release")
        elif self.phase == "release":
            action, _ = self._move(eef, OPEN)
            if self.t > 8:
                self._next("retreat")
        else:
            action, _ = self._move(np.r_[target[:2], self.carry_z + 0.05], OPEN)
        return action
