"""Policies that drive batched rollouts: the StreamVLN agent, and the expert, random and forward baselines.

All share one interface: `reset(i, episode)` when environment i starts an episode, and
`act(observations, active) -> {i: action}` for the environments still running.
"""

from __future__ import annotations

import hashlib

import numpy as np

from streamvln.sim.base import FORWARD, STOP

from .streaming import StreamingAgent


def _episode_seed(seed: int, episode) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|{episode.scene_id}|{episode.episode_id}".encode()).digest()[:8],
                          "little")


class AgentPolicy:
    def __init__(self, agent: StreamingAgent):
        self.agent = agent

    def reset(self, i, episode):
        self.agent.reset(i, f"{episode.scene_id}|{episode.episode_id}", episode.instruction_text)

    def act(self, observations, active):
        return self.agent.act([o.rgb for o in observations], active)


class ExpertPolicy:
    """The geodesic expert walking the reference path (waypoint radius 0.5 m, the last 0.25 m): the upper bound."""

    def __init__(self, sims, intermediate_radius: float = 0.5, final_radius: float = 0.25):
        self.sims, self.mid, self.final = sims, intermediate_radius, final_radius
        self.waypoints, self.k = {}, {}

    def reset(self, i, episode):
        self.waypoints[i] = [p for p in episode.reference_path[1:]] or [episode.goal_position]
        self.k[i] = 0

    def act(self, observations, active):
        out = {}
        for i in active:
            wps = self.waypoints[i]
            while True:
                last = self.k[i] == len(wps) - 1
                a = self.sims[i].expert_action(wps[self.k[i]], self.final if last else self.mid)
                if a == STOP and not last:
                    self.k[i] += 1
                    continue
                break
            out[i] = a
        return out


class RandomPolicy:
    """Actions drawn with fixed probabilities (default: roughly the demo data's shares), seeded per episode."""

    def __init__(self, seed: int = 0, probs=(0.02, 0.7, 0.14, 0.14)):
        self.seed, self.probs, self.rngs = seed, np.asarray(probs) / np.sum(probs), {}

    def reset(self, i, episode):
        self.rngs[i] = np.random.default_rng(_episode_seed(self.seed, episode))

    def act(self, observations, active):
        return {i: int(self.rngs[i].choice(4, p=self.probs)) for i in active}


class ForwardPolicy:
    """Walk straight until a step is refused, then stop."""

    def reset(self, i, episode):
        pass

    def act(self, observations, active):
        return {i: STOP if o.collided else FORWARD for i, o in zip(active, observations)}


BASELINES = ("expert", "random", "forward")
