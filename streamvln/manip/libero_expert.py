"""A scripted pick-and-place expert for LIBERO tasks whose goal is one object in or on another (privileged state).

Covers goals `(In obj region)` and `(On obj target)`: every libero_object task and most of
libero_spatial. A proportional controller on the simulator's object poses walks the waypoints
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
CARRY_Z = 0.30  # carry height above the table: clears LIBERO's baskets and caddies
ABOVE = 0.10  # approach from this far above the object
OPEN, CLOSE = 1.0, -1.0


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
        # held by its neck, where the hand does not strike its cap.
        centre, top = self._pos(self.obj)[2], self._top(self.obj)
        self.grip_offset = max(centre + 0.01, top - 0.025) - centre

    def _top(self, name: str) -> float:
        """The highest point of the object's collision geoms (world z), from MuJoCo's bounding boxes."""
        import mujoco

        m, d = self.env.env.sim.model._model, self.env.env.sim.data._data
        top = -np.inf
        for g in range(m.ngeom):
            body = mujoco.mj_id2name(m, mujoco.mjtObj.mjOBJ_BODY, int(m.geom_bodyid[g])) or ""
            if body.startswith(name) and m.geom_contype[g]:
                rot = d.geom_xmat[g].reshape(3, 3)
                centre = d.geom_xpos[g] + rot @ m.geom_aabb[g][:3]
                top = max(top, float(centre[2] + np.abs(rot[2]) @ m.geom_aabb[g][3:]))
        return top if np.isfinite(top) else float(self._pos(name)[2]) + 0.05

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
            action, err = self._move(obj + [0, 0, ABOVE], OPEN)
            if err < 0.015 or self.t > 60:
                self._next("descend")
        elif self.phase == "descend":
            action, err = self._move(obj + [0, 0, self.grip_offset], OPEN)
            if err < 0.01 or self.t > 30:
                self._next("grasp")
        elif self.phase == "grasp":  # close in place; the fingers take ~10 steps
            action, _ = self._move(eef, CLOSE)
            if self.t > 10:
                self._next("lift")
        elif self.phase == "lift":
            action, _ = self._move(np.r_[obj[:2], CARRY_Z], CLOSE)
            if eef[2] > CARRY_Z - 0.05:
                self._next("carry")
        elif self.phase == "carry":
            action, err = self._move(np.r_[target[:2], CARRY_Z], CLOSE)
            if err < 0.02 or self.t > 80:
                self._next("lower")
        elif self.phase == "lower":
            action, err = self._move(np.r_[target[:2], target[2] + 0.15], CLOSE)
            if err < 0.02 or self.t > 40:
                self._next("release")
        elif self.phase == "release":
            action, _ = self._move(eef, OPEN)
            if self.t > 8:
                self._next("retreat")
        else:
            action, _ = self._move(np.r_[target[:2], CARRY_Z + 0.05], OPEN)
        return action
