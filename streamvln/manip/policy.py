"""Policies for the tabletop behind one batched interface: the VLA model, the scripted expert, the zero action.

`reset(i, task, instruction)` starts a subtask in environment i (RoboVLMs' model.reset() per subtask);
`act(envs, obs, active)` returns one CALVIN relative action (7,) per active environment, the model
called once for all of them.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from pipeline.calvin import denormalize_actions
from pipeline.images import encode_array
from streamvln.data.decode import decode_jpeg

from .expert import Expert
from .tabletop import Tabletop

EXECUTE_MODES = ("first", "chunk")


class ZeroPolicy:
    """The zero-action baseline: the arm holds still with the gripper open."""

    needs_images = False

    def reset(self, i: int, task: str, instruction: str) -> None:
        pass

    def act(self, envs: list[Tabletop], obs: list[dict], active: list[int]) -> list[np.ndarray]:
        return [np.array([0, 0, 0, 0, 0, 0, 1], dtype=np.float32) for _ in active]


class ExpertPolicy:
    """The scripted expert on privileged state: the upper bound of what the demonstrations show.

    make_expert(task, env) builds one for a subtask (a sim's make_expert; the tabletop's Expert by default)."""

    needs_images = False

    def __init__(self, make_expert=None):
        self.make_expert = make_expert or Expert
        self.experts: dict[int, object] = {}
        self.pending: dict[int, str] = {}

    def reset(self, i: int, task: str, instruction: str) -> None:
        self.pending[i] = task
        self.experts.pop(i, None)

    def act(self, envs, obs, active):
        out = []
        for i in active:
            if i in self.pending:  # built at the subtask's first step, from the state it starts in
                self.experts[i] = self.make_expert(self.pending.pop(i), envs[i])
            out.append(self.experts[i].act())
        return out


class VLAPolicy:
    """The VLA model, batched over environments.

    Frames go through the shards' own path (bicubic resize to the model's size, JPEG, decode), so the
    model sees at run time what it was trained on. post / one-step: each step's ACT feature is computed
    once and kept (the last W); the head runs over them, as RoboVLMs' history_memory. pre: the last W
    steps' frames are one interleaved sequence each step. discrete: greedy tokens of the current step.
    execute first (RoboVLMs): the first action of the newest chunk, the model asked every step; chunk: the
    whole chunk is executed before the next query (features are still recorded every step).
    """

    needs_images = True

    def __init__(self, model, tokenizer, prompt: str, image_size: int, execute: str = "first",
                 jpeg_quality: int = 95, device="cpu"):
        if execute not in EXECUTE_MODES:
            raise ValueError(f"execute must be one of {EXECUTE_MODES}, got {execute!r}")
        self.model, self.tok, self.prompt = model.eval(), tokenizer, prompt
        self.size, self.quality, self.execute, self.device = image_size, jpeg_quality, execute, device
        cfg = model.config
        self.window, self.cams = cfg.window, 2 if cfg.use_hand_rgb else 1
        self.norm = (cfg.action_normalization, cfg.action_q01, cfg.action_q99)
        self.history: dict[int, deque] = {}
        self.queue: dict[int, list[np.ndarray]] = {}
        self.ids: dict[int, list[int]] = {}

    def reset(self, i: int, task: str, instruction: str) -> None:
        self.history[i] = deque(maxlen=1 if self.model.config.history_type == "one-step" else self.window)
        self.queue[i] = []
        self.ids[i] = self.tok.encode(self.prompt.format(instruction=instruction), add_special_tokens=False)

    def _frames(self, o: dict) -> torch.Tensor:
        cams = [o["rgb_static"], o["rgb_gripper"]][: self.cams]
        frames = [decode_jpeg(encode_array(c, self.size, self.quality), self.size) for c in cams]
        return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)  # [cams, 3, H, W] uint8

    def _text(self, envs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(len(self.ids[i]) for i in envs)
        ids = torch.zeros((len(envs), length), dtype=torch.long)
        mask = torch.zeros((len(envs), length), dtype=torch.bool)
        for row, i in enumerate(envs):
            ids[row, : len(self.ids[i])] = torch.tensor(self.ids[i])
            mask[row, : len(self.ids[i])] = True
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def act(self, envs, obs, active):
        cfg = self.model.config
        frames = {i: self._frames(obs[i]) for i in active}
        ask = [i for i in active if not self.queue[i]]
        if cfg.head != "discrete" and cfg.history_type != "pre":  # features every step, for the history
            ids, mask = self._text(active)
            feats = self.model.step_feature(torch.stack([frames[i] for i in active]).to(self.device), ids, mask)
            for row, i in enumerate(active):
                self.history[i].append(feats[row])
        else:
            for i in active:
                self.history[i].append(frames[i])
        by_length: dict[int, list[int]] = {}
        for i in ask:  # windows of equal length run together
            by_length.setdefault(len(self.history[i]), []).append(i)
        for group in by_length.values():
            ids, mask = self._text(group)
            if cfg.head != "discrete" and cfg.history_type != "pre":
                chunks = self.model.predict_from_features(torch.stack([torch.stack(list(self.history[i])) for i in group]))
            else:
                window = [list(self.history[i]) if cfg.head != "discrete" else [self.history[i][-1]] for i in group]
                # [E, w, cams, 3, H, W] -> static frames of the window, then its gripper frames
                images = torch.stack([torch.stack(w) for w in window]).transpose(1, 2).flatten(1, 2)
                chunks = self.model.predict(images.to(self.device), ids, mask)
            actions = denormalize_actions(chunks.float().cpu().numpy(), *self.norm)
            for row, i in enumerate(group):
                self.queue[i] = list(actions[row]) if self.execute == "chunk" else [actions[row][0]]
        return [self.queue[i].pop(0) for i in active]
