"""Batched rollouts: N simulators stepped in lockstep, one policy call per step for all of them.

The one rollout path that evaluation, DAgger and RL use. Each environment takes the next episode
from the list as soon as its current one ends, so N environments stay busy; results come back per
episode, in completion order, with the metrics, the path and the actions. An item of the list may
wrap its episode (`item.episode`: RL's group members); a policy may end an episode without an
action by answering None for it (RL's interventions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from streamvln.sim.base import SimulatorError, ground_pose


@dataclass
class EpisodeResult:
    episode: object
    metrics: dict | None
    path: list = field(default_factory=list)
    actions: list = field(default_factory=list)
    frames: list = field(default_factory=list)  # first-person frames when asked for (videos)
    poses: list = field(default_factory=list)  # with the frames: each one's (x, z, heading)
    error: str | None = None
    info: dict = field(default_factory=dict)  # what the policy reports of the episode (DAgger's interventions)


def rollout(sims, policy, episodes, keep_frames: bool = False):
    """Yield an EpisodeResult per episode; an episode the simulator refuses yields its error instead."""
    todo = list(episodes)[::-1]
    running: dict[int, tuple] = {}
    obs: dict[int, object] = {}

    def start(i):
        while todo:
            ep = todo.pop()
            try:
                o = sims[i].reset(getattr(ep, "episode", ep))
            except SimulatorError as e:
                yield EpisodeResult(ep, None, error=str(e))
                continue
            policy.reset(i, ep)
            kept = ([o.rgb], [ground_pose(sims[i])]) if keep_frames else ([], [])
            running[i] = (ep, [], *kept)
            obs[i] = o
            return

    for i in range(len(sims)):
        yield from start(i)
    while running:
        active = sorted(running)
        actions = policy.act([obs[i] for i in active], active)
        for i in active:
            ep, acts, frames, poses = running[i]
            ended = actions[i] is None
            if not ended:
                a = int(actions[i])
                obs[i] = sims[i].step(a)
                acts.append(a)
                if keep_frames:
                    frames.append(obs[i].rgb)
                    poses.append(ground_pose(sims[i]))
            if ended or sims[i].done:
                del running[i]
                path = [[float(v) for v in p] for p in sims[i].agent_path()]
                info = policy.episode_info(i) if hasattr(policy, "episode_info") else {}
                yield EpisodeResult(ep, sims[i].metrics(), path, acts, frames, poses, info=info)
                yield from start(i)
