"""Sessions over one streaming agent (create, step, reset, close, idle expiry); waiting steps share one batched call.

Each session owns one environment slot of a `StreamingAgent` (its window, KV cache, memory frames and
action queue live there). Step requests are queued; one batcher thread takes every queued step, waiting
up to `batch_wait_ms` for the other live sessions' steps, and calls `agent.act` once for all of them:
the agent's own batched path, the one evaluation, DAgger and RL use. Only that thread runs the model.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamvln.agent.turns import STOP

from .config import ServeConfig
from .inputs import InputError, check_instruction
from .metrics import Metrics

log = logging.getLogger("streamvln.serve")


class ServeError(InputError):
    """A refused request: HTTP status, metric kind and message (404, 409, 410, 429, 500, plus InputError's)."""


@dataclass
class Session:
    id: str
    slot: int
    instruction: str
    episode: str | None  # the key of the agent's per-episode draws (null: the instruction)
    chunk: bool  # each step is a decision and answers the whole chunk (the reference's protocol)
    options: dict
    last_used: float
    steps: int = 0
    decisions: int = 0
    episodes: int = 1
    stopped: bool = False
    busy: bool = False  # a step is queued or being decided
    last: dict | None = None  # the last answer: a client that lost it (a dropped connection) reads it back
    log: Path | None = None

    def view(self, now: float) -> dict:
        return {"session": self.id, "instruction": self.instruction, "chunk": self.chunk, "steps": self.steps,
                "decisions": self.decisions, "episodes": self.episodes, "stopped": self.stopped,
                "idle_s": round(now - self.last_used, 3), "last": self.last}


@dataclass
class _Step:
    session: Session
    rgb: np.ndarray
    data: bytes
    future: Future = field(default_factory=Future)


class Engine:
    def __init__(self, agent, cfg: ServeConfig, metrics: Metrics | None = None, clock=time.monotonic):
        if len(agent.envs) < cfg.max_sessions:
            raise ValueError(f"the agent has {len(agent.envs)} environments for {cfg.max_sessions} sessions")
        self.agent, self.cfg, self.clock = agent, cfg, clock
        self.metrics = metrics or Metrics()
        self.sessions: dict[str, Session] = {}
        self.expired: OrderedDict[str, float] = OrderedDict()  # recently expired ids: 410, not 404
        self.free = list(range(cfg.max_sessions))[::-1]
        self.cond = threading.Condition()
        self.agent_lock = threading.Lock()
        self.pending: list[_Step] = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="streamvln-batcher", daemon=True)
        self.thread.start()

    # ---- sessions -------------------------------------------------------------------------------
    def create(self, instruction: str, episode: str | None = None, chunk: bool = False,
               temperature: float | None = None, sample_seed: int = 0,
               reference_memory_text: bool | None = None) -> Session:
        instruction = check_instruction(instruction, self.cfg)
        if temperature is not None and not temperature > 0:
            raise ServeError(422, "bad_request", f"temperature must be > 0 (null: greedy), got {temperature}")
        with self.cond:
            self._expire_idle()
            if not self.free:
                raise ServeError(429, "too_many_sessions", f"all {self.cfg.max_sessions} sessions are open: close "
                                                           f"one, or wait for idle ones to expire")
            s = Session(secrets.token_hex(16), self.free.pop(), instruction, episode, chunk,
                        {"temperature": temperature, "sample_seed": sample_seed,
                         "reference_memory_text": reference_memory_text}, self.clock())
            s.busy = True  # until its agent slot is reset
            self.sessions[s.id] = s
            self.metrics.set("streamvln_sessions", len(self.sessions))
        self._reset_agent(s)
        self.metrics.inc("streamvln_sessions_created_total")
        if self.cfg.session_log:
            s.log = Path(self.cfg.session_log) / s.id  # the server's own random id, never client text
            (s.log / "frames").mkdir(parents=True, exist_ok=True)
            self._log_event(s, {"event": "create", "instruction": instruction, "episode_key": episode, "chunk": chunk,
                                **s.options})
        with self.cond:
            s.busy = False
        return s

    def _reset_agent(self, s: Session) -> None:
        with self.agent_lock:
            self.agent.reset(s.slot, s.episode if s.episode is not None else s.instruction, s.instruction,
                             temperature=s.options["temperature"], sample_seed=s.options["sample_seed"],
                             reference_memory_text=s.options["reference_memory_text"])

    def _get(self, sid: str) -> Session:
        """The open session `sid` (under the lock); an idle one expires here even before the reaper sees it."""
        s = self.sessions.get(sid)
        if s is not None and not s.busy and self.clock() - s.last_used > self.cfg.idle_timeout_s:
            self._expire(s)
            s = None
        if s is None:
            if sid in self.expired:
                raise ServeError(410, "expired", f"session {sid} expired after {self.cfg.idle_timeout_s:g} s "
                                                 f"without a request: create a new one")
            raise ServeError(404, "unknown_session", f"no open session {sid!r}")
        return s

    def view(self, sid: str) -> dict:
        with self.cond:
            return self._get(sid).view(self.clock())

    def reset(self, sid: str, instruction: str | None = None) -> Session:
        """A new episode in the same session (a new instruction optional): window, memory and queue cleared."""
        if instruction is not None:
            instruction = check_instruction(instruction, self.cfg)
        with self.cond:
            s = self._get(sid)
            if s.busy:
                raise ServeError(409, "busy", f"session {sid} has a step in flight: reset after its answer")
            s.busy, s.instruction = True, instruction or s.instruction
            s.steps, s.stopped, s.last, s.last_used, s.episodes = 0, False, None, self.clock(), s.episodes + 1
        self._reset_agent(s)
        if s.log:
            self._log_event(s, {"event": "reset", "instruction": s.instruction})
        with self.cond:
            s.busy = False
        return s

    def close(self, sid: str) -> None:
        with self.cond:
            s = self._get(sid)
            if s.busy:
                raise ServeError(409, "busy", f"session {sid} has a step in flight: close after its answer")
            self._drop(s)

    def _drop(self, s: Session) -> None:
        del self.sessions[s.id]
        self.free.append(s.slot)
        self.free.sort(reverse=True)  # the lowest free slot next: the same requests fill the same slots
        self.metrics.set("streamvln_sessions", len(self.sessions))
        self.cond.notify_all()  # a batch waiting for this session's step stops waiting

    def _expire(self, s: Session) -> None:
        self._drop(s)
        self.expired[s.id] = self.clock()
        while len(self.expired) > 4096:
            self.expired.popitem(last=False)
        self.metrics.inc("streamvln_sessions_expired_total")
        if s.log:
            self._log_event(s, {"event": "expired"})

    def _expire_idle(self) -> None:
        now = self.clock()
        for s in list(self.sessions.values()):
            if not s.busy and now - s.last_used > self.cfg.idle_timeout_s:
                self._expire(s)

    # ---- steps ----------------------------------------------------------------------------------
    def submit(self, sid: str, rgb: np.ndarray, data: bytes = b"") -> Future:
        """Queue one frame of session `sid`; the future gets its answer (or a ServeError)."""
        with self.cond:
            s = self._get(sid)
            if s.busy:
                raise ServeError(409, "busy", f"session {sid} already has a step in flight: wait for its answer")
            if s.stopped:
                raise ServeError(409, "stopped", f"session {sid} stopped (STOP at step {s.steps - 1}): reset it "
                                                 f"for a new episode, or close it")
            s.busy, s.last_used = True, self.clock()
            step = _Step(s, rgb, data)
            self.pending.append(step)
            self.cond.notify_all()
        return step.future

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self._stop:
                    self.cond.wait(timeout=min(1.0, self.cfg.idle_timeout_s / 4))
                    self._expire_idle()
                if self._stop:
                    break
                deadline = time.monotonic() + self.cfg.batch_wait_ms / 1000
                while True:
                    live = sum(not s.stopped for s in self.sessions.values())
                    full = self.cfg.max_batch and len(self.pending) >= self.cfg.max_batch
                    left = deadline - time.monotonic()
                    if full or len(self.pending) >= live or left <= 0 or self._stop:
                        break
                    self.cond.wait(left)
                n = self.cfg.max_batch or len(self.pending)
                batch, self.pending = self.pending[:n], self.pending[n:]
            self._decide(batch)
        for step in self.pending:
            step.future.set_exception(ServeError(503, "shutdown", "the server is shutting down"))

    def _decide(self, batch: list[_Step]) -> None:
        t0 = time.perf_counter()
        slots = [st.session.slot for st in batch]
        try:
            with self.agent_lock:
                turns = [self.agent.envs[k].turns for k in slots]
                actions = self.agent.act([st.rgb for st in batch], active=slots)
                answers = []
                for st, before in zip(batch, turns):
                    s, env = st.session, self.agent.envs[st.session.slot]
                    decided = env.turns != before
                    chunk = [int(actions[s.slot])] + [int(a) for a in env.queue]
                    if STOP in chunk:
                        chunk = chunk[: chunk.index(STOP) + 1]  # nothing after a STOP is ever executed
                    if s.chunk:
                        self.agent.clear_queue(s.slot)  # the robot runs the chunk: the next frame decides anew
                    stop = STOP in chunk if s.chunk else chunk[0] == STOP
                    answers.append({"session": s.id, "episode_index": s.episodes, "step": s.steps,
                                    "action": chunk[0], "actions": chunk, "stop": stop, "decided": decided,
                                    "text": env.last_text if decided else None})
        except Exception as e:  # a model failure answers 500 for this batch; the service keeps serving
            log.exception("agent call failed")
            with self.cond:
                for st in batch:
                    st.session.busy = False
            for st in batch:
                self.metrics.inc("streamvln_errors_total", kind="internal")
                st.future.set_exception(ServeError(500, "internal", f"the agent call failed: {type(e).__name__}"))
            return
        decided = sum(a["decided"] for a in answers)
        if decided:
            self.metrics.inc("streamvln_model_calls_total")
            self.metrics.observe("streamvln_batch_size", decided)
            self.metrics.observe("streamvln_model_call_seconds", time.perf_counter() - t0)
        self.metrics.inc("streamvln_decisions_total", decided)
        self.metrics.inc("streamvln_steps_total", len(batch))
        with self.cond:
            for st, answer in zip(batch, answers):
                s = st.session
                s.steps, s.decisions, s.stopped = s.steps + 1, s.decisions + answer["decided"], answer["stop"]
                s.busy, s.last, s.last_used = False, answer, self.clock()
        for st, answer in zip(batch, answers):
            st.future.set_result(answer)
        for st, answer in zip(batch, answers):
            if st.session.log:
                self._log_step(st, answer)

    # ---- the optional per-session log ------------------------------------------------------------
    def _log_event(self, s: Session, row: dict) -> None:
        with open(s.log / "steps.jsonl", "a") as f:
            f.write(json.dumps({"t": round(time.time(), 3), **row}) + "\n")

    def _log_step(self, st: _Step, answer: dict) -> None:
        s = st.session
        ext = "png" if st.data[:8] == b"\x89PNG\r\n\x1a\n" else "jpg"
        name = f"{answer['episode_index']:03d}_{answer['step']:06d}.{ext}"
        (s.log / "frames" / name).write_bytes(st.data)  # the bytes as posted
        keys = ("episode_index", "step", "action", "actions", "stop", "decided", "text")
        self._log_event(s, {"event": "step", **{k: answer[k] for k in keys}})

    def shutdown(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        self.thread.join(timeout=30)
