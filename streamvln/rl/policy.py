"""RL rollouts: the streaming agent (greedy or sampled) with expert intervention, recording what the update needs.

`RLPolicy` drives N environments through the shared rollout (`streamvln.agent.rollout`). Each item
is a `Member`: one of a group's G rollouts of the same episode with its own instruction (B1):
member 0 decides greedily, the others sample at the configured temperature from their own seeded
generator. Per step, before the action, the intervention (intervention.py) says who acts; the
policy's choices are reviewed (premature or lingering STOP); with the stall option, a policy that
comes no closer to the goal for stall_patience steps ends its episode; rewards come from rewards.py.

Recorded per episode (`episode_info`): the steps (source, action, the expert's label in that state,
reward), the decisions with their exact context and tokens and the behaviour log-probability (B2,
B4), the outcome and the simulator's metrics, read before anything else moves the agent (B8: there
is no teleport here; interventions act in place).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from pipeline.dialogue import CONJUNCTIONS
from streamvln.sim.base import STOP

from .config import RLConfig
from .intervention import Intervention
from .rewards import reference_length, step_reward, terminal_reward

NUM_FUTURE_STEPS = 4  # actions per answer in the training data: an expert chunk's length


@dataclass(frozen=True)
class Member:
    episode: object  # NavEpisode
    member: int  # 0: greedy; 1..G-1: sampled
    update: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.episode.scene_id}|{self.episode.episode_id}"

    def sample_seed(self) -> int:
        digest = hashlib.sha256(f"{self.seed}|{self.update}|{self.key}|{self.member}".encode()).digest()
        return int.from_bytes(digest[:8], "little")


@dataclass
class Decision:
    frames: list  # the episode's frames (the context's frame indices point into it)
    context: list  # the agent's pieces
    tokens: list  # generated (policy) or the expert's answer (oracle, filled at the end)
    logp: float  # behaviour log-probability at the policy temperature (policy decisions)
    kind: str  # "policy" or "oracle"
    steps: list = field(default_factory=list)  # indices of the steps it covers
    sft: list | None = None  # the expert's answer for these steps (SFT target), set at the episode's end


@dataclass
class Step:
    source: str  # "policy", "expert" (recovery), "forced" (goal-zone STOP), "refused" (premature STOP)
    action: int
    label: int | None  # the expert's action in this state (None when not needed)
    reward: float = 0.0


@dataclass
class EnvRun:
    member: Member
    intervention: Intervention
    d_prev: float = 0.0
    steps: list = field(default_factory=list)
    decisions: list = field(default_factory=list)
    turns: int = 0  # agent decisions seen so far
    oracle: Decision | None = None  # the expert chunk being filled
    outcome: str | None = None
    conj: random.Random = field(default_factory=random.Random)
    closest: float = float("inf")  # the closest approach to the goal so far (the stall option)
    stalled: int = 0  # consecutive policy steps outside the goal zone without a new closest approach


class RLPolicy:
    def __init__(self, agent, sims, cfg: RLConfig):
        self.agent, self.sims, self.cfg = agent, sims, cfg
        self.runs: dict[int, EnvRun] = {}
        self.need_labels = cfg.enable_recovery or (cfg.use_hybrid_training and cfg.sft_use_policy_steps
                                                   and not cfg.sft_oracle_only)

    def reset(self, i: int, member: Member) -> None:
        ep = member.episode
        greedy = member.member == 0
        self.agent.reset(i, member.key, ep.instruction_text, temperature=None if greedy else self.cfg.temperature,
                         sample_seed=member.sample_seed())
        d = self.sims[i].metrics()["distance_to_goal"]
        self.runs[i] = EnvRun(member, Intervention(self.cfg, ep), d_prev=d, conj=random.Random(member.sample_seed()),
                              closest=d)

    def _stall(self, run: EnvRun, d: float) -> bool:
        """The stall option: counts the policy's steps that came no closer to the goal than ever before."""
        policy_step = run.steps[-1].source == "policy"
        if d < run.closest - 1e-6 or d <= self.cfg.goal_radius or not policy_step:
            run.stalled = 0
        else:
            run.stalled += 1
        run.closest = min(run.closest, d)
        return 0 < self.cfg.stall_patience <= run.stalled

    def act(self, observations, active):
        out, model, expert = {}, [], []
        for obs, i in zip(observations, active):
            run, sim = self.runs[i], self.sims[i]
            d = sim.metrics()["distance_to_goal"]
            if run.steps:  # the previous step's reward, now that its outcome is known
                run.steps[-1].reward = step_reward(self.cfg, run.d_prev, d, obs.collided)
                if self._stall(run, d):
                    run.outcome = "stalled"
            run.d_prev = d
            if run.outcome == "stalled":
                out[i] = None
                continue
            if len(run.steps) >= self.cfg.max_steps_per_episode:
                run.outcome = "step_limit"
                out[i] = None
                continue
            position, heading = sim.agent_pose()
            who = run.intervention.observe(position, heading, d)
            if who == "end":
                run.outcome = "recovery_timeout"
                out[i] = None
                continue
            label = run.intervention.expert_label(sim) if self.need_labels or who == "expert" else None
            run.steps.append(Step("expert" if who == "expert" else "policy", -1, label))
            (expert if who == "expert" else model).append(i)
        live = [i for i in active if i not in out]
        proposed = self.agent.act([o.rgb for o, i in zip(observations, active) if i in live], live, decide=model)
        for i in expert:
            run = self.runs[i]
            if self.agent.queued(i):
                self.agent.clear_queue(i)  # the model's remaining chunk is void: it decides anew afterwards
            step = run.steps[-1]
            step.action = step.label
            self._oracle_step(i, run, step)
            out[i] = step.action
        for i in model:
            run, step = self.runs[i], self.runs[i].steps[-1]
            run.oracle = None
            env = self.agent.envs[i]
            if env.turns != run.turns:  # a new decision: its context, tokens and behaviour log-probability
                run.turns = env.turns
                run.decisions.append(Decision(env.frames, env.last_context, env.last_tokens, env.last_logp, "policy"))
            run.decisions[-1].steps.append(len(run.steps) - 1)
            action = proposed[i]
            verdict = run.intervention.review(action, run.d_prev)
            step.action = action
            if verdict == "premature_stop":  # not executed: the episode ends as a failure
                step.source = "refused"
                run.outcome = "premature_stop"
                out[i] = None
            elif verdict == "force_stop":  # the expert's call here is STOP: executed and taught
                step.source, step.action, step.label = "forced", STOP, STOP
                self._oracle_step(i, run, step, new=True)
                out[i] = STOP
            else:
                out[i] = action
        return out

    def _oracle_step(self, i: int, run: EnvRun, step: Step, new: bool = False) -> None:
        """Expert-driven steps are grouped into chunks of NUM_FUTURE_STEPS, each an SFT sample whose
        context is what the model would have been asked at the chunk's first frame."""
        if new or run.oracle is None or len(run.oracle.steps) >= NUM_FUTURE_STEPS:
            context = self.agent.snapshot_turn(i, run.conj.choice(CONJUNCTIONS))
            run.oracle = Decision(self.agent.envs[i].frames, context, [], 0.0, "oracle")
            run.decisions.append(run.oracle)
        run.oracle.steps.append(len(run.steps) - 1)

    def episode_info(self, i: int) -> dict:
        run, sim = self.runs[i], self.sims[i]
        metrics = sim.metrics()
        if run.outcome is None:  # the simulator ended it: a STOP was executed, or its own step limit
            last = run.steps[-1] if run.steps else None
            run.outcome = "stop" if last is not None and last.action == STOP and last.source == "policy" else (
                "forced_stop" if last is not None and last.source == "forced" else "step_limit")
        success = run.outcome == "stop" and metrics["success"] == 1.0
        terminal = terminal_reward(self.cfg, metrics["distance_to_goal"], success, metrics["path_length"],
                                   reference_length(run.member.episode),
                                   {"stalled": self.cfg.stall_penalty,
                                    "premature_stop": self.cfg.premature_stop_penalty}.get(run.outcome, 0.0))
        if run.steps:
            # the last step's own reward is replaced by the terminal one (the guide's terminal step)
            run.steps[-1].reward = terminal
        for decision in run.decisions:  # SFT targets: the expert's labels of the steps each decision covered
            labels = [run.steps[k].label for k in decision.steps if run.steps[k].label is not None]
            if STOP in labels:
                labels = labels[: labels.index(STOP) + 1]
            decision.sft = self.agent.turns.answer_ids(labels).tolist() if labels else None
        expert_steps = sum(s.source in ("expert", "forced") for s in run.steps)
        return {
            "member": run.member, "steps": run.steps, "decisions": run.decisions, "outcome": run.outcome,
            "return": sum(s.reward for s in run.steps) if run.steps else terminal,
            "success": float(success), "spl": metrics["spl"] if success else 0.0,
            "metrics": metrics, "expert_steps": expert_steps,
            "interventions": run.intervention.recoveries + (run.outcome in ("premature_stop", "forced_stop", "stalled")),
        }
