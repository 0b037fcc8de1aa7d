"""Per-step rewards of the two phases, with a terminal reward for every way an episode ends (B9-B11 fixed).

phase1_stop (the guide's): +progress_reward when the geodesic distance to the goal shrinks, else
-progress_reward (turning in place costs it too); -collision_penalty when a forward step is blocked.
phase2_progress (documented in the guide, missing from its code, B6): the metres of geodesic
progress (d_prev - d_new: +0.25 per step straight at the goal, negative when moving away, 0 for a
turn), minus the collision penalty. Terminal step of either phase (STOP executed, the step limit,
or an intervention ending the episode): -d / terminal_distance_scale, plus on success
success_reward + spl_reward x L_ref / max(L_ref, L_agent) with the agent's real path length (B11),
clipped to +-reward_clip. An intervention-ended episode is a failure: it gets the terminal reward
without the success terms (B9). A stalled episode (the stall option, beyond the guide) is a failure
charged stall_penalty on top; a refused premature STOP is charged premature_stop_penalty (also beyond it).
"""

from __future__ import annotations

import math

from .config import RLConfig


def reference_length(episode) -> float:
    """Length of the reference path (x-z plane, y is up) through to the goal."""
    points = [(p[0], p[2]) for p in episode.reference_path] + [(episode.goals[0]["position"][0],
                                                                 episode.goals[0]["position"][2])]
    return sum(math.dist(a, b) for a, b in zip(points, points[1:]))


def step_reward(cfg: RLConfig, d_prev: float, d_new: float, collided: bool) -> float:
    if cfg.phase == "phase1_stop":
        reward = cfg.progress_reward if d_new < d_prev else -cfg.progress_reward
    else:
        reward = d_prev - d_new
    return reward - (cfg.collision_penalty if collided else 0.0)


def terminal_reward(cfg: RLConfig, d_final: float, success: bool, agent_length: float, ref_length: float,
                    penalty: float = 0.0) -> float:
    reward = -d_final / cfg.terminal_distance_scale - penalty
    if success:
        reward += cfg.success_reward + cfg.spl_reward * ref_length / max(ref_length, agent_length, 1e-6)
    return max(-cfg.reward_clip, min(cfg.reward_clip, reward))
