"""The DAgger mixed policy: per chunk the expert or the model acts; the reference's intervention rules; the save rule.

One `DaggerPolicy` drives N environments through the shared rollout (`streamvln.agent.rollout`):
the model's chunks come from the streaming agent (batched over the environments the model acts
for), the expert's from the geodesic follower walking the episode's reference path. What the
reference does (`streamvln_dagger.py`, reference document section 10), step by step:

1. A chunk starts when the model's queue is empty and no expert actions are left: the expert takes
   it if an intervention is in force or with probability beta = p ** iteration, else the model.
   An expert chunk is `num_future_steps` expert actions, asked one step at a time.
2. The expert's action here: the follower toward the next reference waypoint (radius 1.8 m, the
   last waypoint 0.25 m); each waypoint it reports reached advances the waypoint and lifts an
   intervention; past the last one the episode is ended with STOP.
3. A disagreement with the expert counts an error. Intolerable: a model STOP 3 m or more from the
   goal, errors over 0.8 x the reference's actions per waypoint segment, or more than 12 errors.
   Then the expert acts, the model's queue is dropped, the errors are reset and the expert keeps
   control up to the next waypoint (the episode no longer counts as a model success).
4. Every other STOP is replaced by the expert's action: episodes end at the path's end (or at the
   step limit).

One departure (docs/dagger.md): the disagreement is counted against the expert's action after
the waypoint has advanced; the reference compares with the follower's STOP at a reached
waypoint, so any move there counted as an error. The expert's action is recorded at every step,
so `labels: expert` can save the classic DAgger labels (the expert's action in each visited
state) instead of the executed actions the reference saves.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field

from streamvln.sim.base import STOP

SAVE_MODES = ("reference", "success", "all")
LABELS = ("executed", "expert")


@dataclass
class DaggerConfig:
    """Defaults are the reference's (its collection script: p 0, iteration 3; its constants)."""

    p: float = 0.0
    iteration: int = 3
    num_future_steps: int = 4  # actions per expert chunk
    intermediate_radius: float = 1.8  # the reference's ShortestPathFollower(goal_radius=1.8)
    final_radius: float = 0.25  # GOAL_RADIUS at the last waypoint
    stop_far_distance: float = 3.0  # a model STOP at least this far from the goal is intolerable
    max_error_ratio: float = 0.8  # errors / (reference actions per waypoint segment)
    max_errors: int = 12
    default_ref_actions: int = 60  # DEFAULT_EPISODE_LENGTH, when the ground-truth annotation is missing
    save: str = "reference"  # reference | success (every successful episode) | all
    save_distance: float = 0.5  # MIDGOAL_RADIUS
    corrected_pl: float = 0.93  # RELATIVE_PATH_LENGTH_THRESHOLD
    clean_pl: float = 0.85  # SUCCESS_RELATIVE_PATH_LENGTH_THRESHOLD
    seed: int = 0  # per-episode chunk draws (the reference seeds Python's RNG with the rank)
    labels: str = "executed"  # executed: the actions taken (reference) | expert: the expert's action at each frame
    # Beyond the reference, off by default: saved episodes also get each frame's description (docs/simulator.md,
    # "A describing expert"), so a describing model's DAgger data can be sharded with `describe: true`
    describe: bool = False

    @property
    def beta(self) -> float:
        return 0.0 if self.p == 0 else self.p ** self.iteration

    def validate(self):
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {self.p}")
        if self.iteration < 0 or self.num_future_steps < 1:
            raise ValueError("iteration must be >= 0 and num_future_steps >= 1")
        if self.save not in SAVE_MODES:
            raise ValueError(f"save must be one of {SAVE_MODES}, got {self.save!r}")
        if self.labels not in LABELS:
            raise ValueError(f"labels must be one of {LABELS}, got {self.labels!r}")
        for name in ("intermediate_radius", "final_radius", "save_distance"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


@dataclass
class EpisodeState:
    waypoints: list
    ref_actions: int
    rng: random.Random
    k: int = 0  # next waypoint (index into waypoints = reference_path[1:])
    from_expert: bool = False
    force_expert: bool = False
    left_expert: int = 0
    errors: int = 0
    model_success: bool = True
    end: bool = False  # the expert walked past the last waypoint: STOP
    interventions: int = 0
    expert_steps: int = 0
    model_steps: int = 0
    max_errors_seen: int = 0
    sources: list = field(default_factory=list)  # "e" / "m" per executed step
    expert_actions: list = field(default_factory=list)  # the expert's action in each step's state


def episode_rng(seed: int, episode) -> random.Random:
    digest = hashlib.sha256(f"dagger|{seed}|{episode.scene_id}|{episode.episode_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def intolerable(cfg: DaggerConfig, s: EpisodeState, action: int, from_model: bool, distance: float) -> bool:
    """The reference's three failure rules (dagger:350-357)."""
    per_segment = max(1, int(s.ref_actions / max(1, len(s.waypoints))))
    return ((from_model and action == STOP and distance >= cfg.stop_far_distance)
            or s.errors / per_segment > cfg.max_error_ratio
            or s.errors > cfg.max_errors)


def save_decision(cfg: DaggerConfig, metrics: dict, model_success: bool) -> tuple[bool, str, str]:
    """Whether an executed episode becomes training data: (save, a fixed kind for counting, why in words).

    The reference's rule (dagger:405): ended within 0.5 m of the goal and either corrected with a
    relative path length under 0.93 or, corrected or not, under 0.85; clean model successes are not kept.
    """
    d, pl = metrics["distance_to_goal"], relative_pl(metrics)
    if cfg.save == "all":
        return True, "all", "every episode is saved (save: all)"
    if cfg.save == "success":
        if metrics["success"]:
            return True, "success", f"successful, ended {d:.2f} m from the goal"
        return False, "not successful", f"not successful, ended {d:.2f} m from the goal"
    if not d < cfg.save_distance:
        return False, "far from the goal", f"ended {d:.2f} m from the goal (needs < {cfg.save_distance})"
    if not model_success and pl < cfg.corrected_pl:
        return True, "corrected", f"corrected, relative path length {pl:.3f} < {cfg.corrected_pl}"
    if pl < cfg.clean_pl:
        return True, "inefficient", f"relative path length {pl:.3f} < {cfg.clean_pl}"
    if model_success:
        return False, "efficient model success", f"model success, relative path length {pl:.3f} >= {cfg.clean_pl}"
    return False, "corrected but efficient", f"corrected, relative path length {pl:.3f} >= {cfg.corrected_pl}"


def relative_pl(metrics: dict) -> float:
    """The reference's PL measure: geodesic start distance / max(it, the Euclidean path length)."""
    d0, length = metrics["geodesic_start"], metrics["path_length"]
    return float(d0 / max(d0, length)) if max(d0, length) > 0 else 1.0


class DaggerPolicy:
    """The rollout policy of DAgger collection: `agent` is a StreamingAgent with one slot per simulator."""

    def __init__(self, agent, sims, cfg: DaggerConfig, ref_actions: dict | None = None):
        cfg.validate()
        self.agent, self.sims, self.cfg = agent, sims, cfg
        self.ref_actions = ref_actions or {}
        self.state: dict[int, EpisodeState] = {}
        self.goals: dict[int, list] = {}

    def reset(self, i, episode):
        self.agent.reset(i, f"{episode.scene_id}|{episode.episode_id}", episode.instruction_text)
        waypoints = list(episode.reference_path[1:]) or [episode.goal_position]
        ref = self.ref_actions.get(str(episode.trajectory_id), self.cfg.default_ref_actions)
        self.state[i] = EpisodeState(waypoints, ref, episode_rng(self.cfg.seed, episode))
        self.goals[i] = episode.goal_position

    def expert(self, i) -> int:
        """The follower's action toward the next waypoint, advancing past reached ones (dagger:334-345)."""
        s, sim = self.state[i], self.sims[i]
        while not s.end:
            last = s.k == len(s.waypoints) - 1
            a = sim.expert_action(s.waypoints[s.k], self.cfg.final_radius if last else self.cfg.intermediate_radius)
            if a != STOP:
                return a
            s.k += 1
            s.force_expert, s.left_expert = False, 0
            s.end = s.k >= len(s.waypoints)
        return STOP

    def act(self, observations, active):
        for i in active:
            s = self.state[i]
            if not self.agent.queued(i) and s.left_expert == 0:  # a chunk starts
                s.from_expert = s.force_expert or s.rng.random() < self.cfg.beta
                if s.from_expert:
                    s.left_expert = self.cfg.num_future_steps
        model = [i for i in active if not self.state[i].from_expert]
        proposed = self.agent.act([o.rgb for o in observations], active, decide=model)
        out = {}
        for i in active:
            s = self.state[i]
            from_model = not s.from_expert
            if from_model:
                action = proposed[i]
            else:
                s.left_expert = max(0, s.left_expert - 1)
            expert = self.expert(i)
            if not from_model:
                action = expert
            s.expert_actions.append(expert)
            if s.end:  # past the last waypoint: the episode ends here, whoever acted
                out[i] = STOP
                s.sources.append("e")
                continue
            s.errors += int(action != expert)
            s.max_errors_seen = max(s.max_errors_seen, s.errors)
            distance = self._distance(i) if from_model and action == STOP else math.inf
            if intolerable(self.cfg, s, action, from_model, distance):
                s.model_success, s.force_expert, s.errors = False, True, 0
                s.interventions += 1
                self.agent.clear_queue(i)
                action, from_model = expert, False
            if action == STOP:  # only the path's end stops an episode
                action = expert
            s.expert_steps += int(not from_model)
            s.model_steps += int(from_model)
            s.sources.append("m" if from_model else "e")
            out[i] = int(action)
        return out

    def _distance(self, i) -> float:
        pos, _ = self.sims[i].agent_pose()
        return self.sims[i].geodesic(pos, self.goals[i])

    def episode_info(self, i) -> dict:
        s = self.state[i]
        return {"model_success": s.model_success, "force_episode_end": s.end, "interventions": s.interventions,
                "accumulated_error": s.errors, "max_accumulated_error": s.max_errors_seen,
                "expert_steps": s.expert_steps, "model_steps": s.model_steps, "ref_actions": s.ref_actions,
                "sources": "".join(s.sources), "expert_actions": list(s.expert_actions)}
