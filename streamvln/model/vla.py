"""The VLA model: the StreamVLN backbone (SigLIP + Qwen2) with RoboVLMs' learnable action token and action heads.

Per observation step the sequence is [static frame tokens][gripper frame tokens][prompt][ACT]; the
last hidden state at ACT is the step's action feature (robovlms.md (c)). History types:
- one-step: each step's feature alone goes through the head (no history);
- post: each step is its own sequence, the head fuses the W features (LSTM / GPT; RoboVLMs' default);
- pre: the W step blocks are one interleaved causal sequence, ACT read at every step.
The discrete head instead appends each step's action tokens (RoboVLMs' 256 bins at the end of the
vocabulary) and eos to the step block and trains the language model's logits on them.
Module names extend the LLaVA-Video layout (model.*, lm_head), so a StreamVLN or LLaVA-Video
checkpoint loads as the backbone; action_token and action_head.* are new.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig

from pipeline.tokens import IGNORE_INDEX

from .config import StreamVLNConfig
from .heads import HEADS, build_head, continuous_loss
from .modeling import StreamVLNForCausalLM

HISTORY_TYPES = ("one-step", "post", "pre")
ARM_LOSSES = ("huber", "mse")


class VLAConfig(StreamVLNConfig):
    model_type = "streamvln_vla"

    def __init__(self, window: int = 8, chunk: int = 10, history_type: str = "post", head: str = "lstm",
                 head_hidden: int = 1024, lstm_layers: int = 4, gpt_layers: int = 8, gpt_heads: int = 8,
                 use_hand_rgb: bool = True, arm_loss: str = "huber", gripper_loss_weight: float = 0.01,
                 action_normalization: str = "calvin", action_q01: list | None = None, action_q99: list | None = None,
                 discrete_orig: int = 151594, discrete_bins: int = 256, discrete_eos: int = 151643, **kwargs):
        if history_type not in HISTORY_TYPES or head not in HEADS or arm_loss not in ARM_LOSSES:
            raise ValueError(f"history_type must be one of {HISTORY_TYPES}, head one of {HEADS}, arm_loss one of "
                             f"{ARM_LOSSES}; got {history_type!r}, {head!r}, {arm_loss!r}")
        self.window, self.chunk, self.history_type, self.head = window, chunk, history_type, head
        self.head_hidden, self.lstm_layers, self.gpt_layers, self.gpt_heads = head_hidden, lstm_layers, gpt_layers, gpt_heads
        self.use_hand_rgb, self.arm_loss, self.gripper_loss_weight = use_hand_rgb, arm_loss, gripper_loss_weight
        # the shards' normalisation, kept with the weights so execution inverts the right one
        self.action_normalization, self.action_q01, self.action_q99 = action_normalization, action_q01, action_q99
        # RoboVLMs' `orig` for the Qwen2 tokenizer (pipeline.calvin.ActionTokenizer.for_tokenizer; tested equal)
        self.discrete_orig, self.discrete_bins, self.discrete_eos = discrete_orig, discrete_bins, discrete_eos
        super().__init__(**kwargs)


AutoConfig.register("streamvln_vla", VLAConfig, exist_ok=True)


class StreamVLNVLA(StreamVLNForCausalLM):
    config_class = VLAConfig

    def __init__(self, config: VLAConfig):
        super().__init__(config)
        self.action_token = nn.Parameter(torch.zeros(config.hidden_size))  # RoboVLMs: zeros(d), learnable
        self.action_head = build_head(config)
        bins = torch.linspace(-1.0, 1.0, config.discrete_bins)
        self.register_buffer("bin_edges", bins, persistent=False)
        self.register_buffer("bin_centers", (bins[:-1] + bins[1:]) / 2, persistent=False)

    # ------------------------------------------------------------------ pieces

    def step_visual(self, images: torch.Tensor, steps: int) -> torch.Tensor:
        """[B, F, 3, H, W] frames (W static, then W gripper) -> [B, steps, tokens, d] per-step visual tokens."""
        cams = 2 if self.config.use_hand_rgb else 1
        if images.shape[1] < cams * steps:
            raise ValueError(f"{images.shape[1]} frames per sample for {steps} steps: the model needs "
                             f"{'both cameras' if cams == 2 else 'the static camera'} (use_hand_rgb={cams == 2})")
        frames = images[:, : cams * steps]
        B = frames.shape[0]
        n = torch.full((B,), cams * steps, dtype=torch.long)
        visual = torch.stack(self.encode_frames(frames, n))  # [B, cams*steps, T, d]
        return torch.cat(visual.split(steps, dim=1), dim=2)  # static and gripper tokens side by side per step

    def discrete_ids(self, actions: torch.Tensor) -> torch.Tensor:
        """Normalised actions [..., 7] (gripper 0/1) -> RoboVLMs' token ids: the gripper is +-1 (extreme bins)."""
        a = torch.cat([actions[..., :6], actions[..., 6:] * 2 - 1], dim=-1).clamp(-1, 1)
        return self.config.discrete_orig - torch.bucketize(a, self.bin_edges, right=True)  # == np.digitize

    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [..., 7] -> normalised actions, the gripper back to 0/1."""
        index = (self.config.discrete_orig - ids - 1).clamp(0, len(self.bin_centers) - 1)
        a = self.bin_centers[index]
        return torch.cat([a[..., :6], (a[..., 6:] > 0).to(a.dtype)], dim=-1)

    def _rows(self, visual, text, lens, tails, interleave: bool):
        """Sequences of step blocks [visual][prompt][tail]: one per (sample, step), or one per sample with the
        W blocks interleaved. Returns embeds, mask, labels [R, L] and, per (sample, step), (row, last position)."""
        rows, row_labels, ends = [], [], []
        d = visual.shape[-1]
        for b in range(visual.shape[0]):
            pieces, labels, pos = [], [], 0
            for t in range(visual.shape[1]):
                tail, tail_labels = tails(b, t)
                block = torch.cat([visual[b, t], text[b, : lens[b]], tail.to(visual.dtype)])
                block_labels = torch.cat([tail_labels.new_full((block.shape[0] - len(tail_labels),), IGNORE_INDEX),
                                          tail_labels])
                if interleave:
                    pieces.append(block)
                    labels.append(block_labels)
                    pos += block.shape[0]
                    ends.append((len(rows), pos - 1))
                else:
                    ends.append((len(rows), block.shape[0] - 1))
                    rows.append(block)
                    row_labels.append(block_labels)
            if interleave:
                rows.append(torch.cat(pieces))
                row_labels.append(torch.cat(labels))
        length = max(r.shape[0] for r in rows)
        embeds = visual.new_zeros((len(rows), length, d))
        mask = torch.zeros((len(rows), length), dtype=torch.bool, device=visual.device)
        out_labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long, device=visual.device)
        for i, (r, lab) in enumerate(zip(rows, row_labels)):
            embeds[i, : r.shape[0]], mask[i, : r.shape[0]], out_labels[i, : r.shape[0]] = r, True, lab
        return embeds, mask, out_labels, ends

    def action_features(self, visual, input_ids, attention_mask, history_type: str | None = None) -> torch.Tensor:
        """[B, W, d]: the last hidden state at each step's ACT token."""
        text = self.model.embed_tokens(input_ids.clamp(min=0))
        lens = attention_mask.sum(1).tolist()
        act = (self.action_token[None], torch.tensor([IGNORE_INDEX], device=visual.device))
        interleave = (history_type or self.config.history_type) == "pre"
        embeds, mask, _, ends = self._rows(visual, text, lens, lambda b, t: act, interleave)
        hidden = self.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        rows, pos = zip(*ends)
        return hidden[list(rows), list(pos)].view(visual.shape[0], visual.shape[1], -1)

    def run_head(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Arm [B, W, N, 6] and gripper logits [B, W, N]; one-step: each step without history."""
        B, W, d = features.shape
        if self.config.history_type == "one-step":
            arm, grip = self.action_head(features.reshape(B * W, 1, d))
            return arm.view(B, W, *arm.shape[2:]), grip.view(B, W, -1)
        return self.action_head(features)

    # ------------------------------------------------------------------ training

    def forward(self, input_ids, attention_mask, images, actions, action_mask, pack_tokens: int = 0,
                full_logits: bool = False, **_batch_extras) -> dict:
        if pack_tokens:
            raise ValueError("pack_tokens: the VLA model's windows are not packed; set it to 0 for manipulation mixes")
        if full_logits:
            raise ValueError("full_logits: the VLA model has an action head, not a language-model loss")
        W, N = actions.shape[1], actions.shape[2]
        if (W, N) != (self.config.window, self.config.chunk) and self.config.history_type != "one-step":
            raise ValueError(f"samples of window {W} and chunk {N}; the model has window {self.config.window} and "
                             f"chunk {self.config.chunk}")
        visual = self.step_visual(images, W)
        mask = action_mask.to(visual.dtype)
        if self.config.head == "discrete":
            return self._discrete_forward(visual, input_ids, attention_mask, actions, action_mask)
        arm, grip = self.run_head(self.action_features(visual, input_ids, attention_mask))
        per_position, mask = continuous_loss(arm, grip, actions.to(arm.dtype), mask, self.config.arm_loss,
                                             self.config.gripper_loss_weight)
        counts = mask.sum((1, 2))
        loss_sum = per_position.sum()
        return {"loss": loss_sum / counts.sum().clamp(min=1), "loss_sum": loss_sum,
                "sample_loss_sum": per_position.detach().sum((1, 2)), "sample_tokens": counts.long(),
                "pred_actions": torch.cat([arm.detach(), torch.sigmoid(grip.detach())[..., None]], dim=-1)}

    def _discrete_forward(self, visual, input_ids, attention_mask, actions, action_mask) -> dict:
        B, W, N = action_mask.shape
        ids = self.discrete_ids(actions)  # [B, W, N, 7]
        labels = ids.masked_fill(~action_mask.bool()[..., None], IGNORE_INDEX).flatten(2)  # [B, W, 7N]
        eos = torch.tensor([self.config.discrete_eos], device=ids.device)
        embed = self.model.embed_tokens
        text = embed(input_ids.clamp(min=0))

        def tail(b, t):
            seq = torch.cat([ids[b, t].flatten(), eos])
            return embed(seq), torch.cat([labels[b, t], eos])

        embeds, mask, targets, _ = self._rows(visual, text, attention_mask.sum(1).tolist(), tail,
                                              self.config.history_type == "pre")
        hidden = self.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        targets = targets[:, 1:]
        labelled = targets != IGNORE_INDEX
        logits = self.lm_head(hidden[:, :-1][labelled]).float()
        token_loss = F.cross_entropy(logits, targets[labelled], reduction="none")
        rows_per_sample = 1 if self.config.history_type == "pre" else W
        owner = torch.nonzero(labelled)[:, 0] // rows_per_sample
        per_sample = torch.zeros(B, device=hidden.device).index_add(0, owner, token_loss.detach())
        counts = torch.bincount(owner, minlength=B)
        # labelled positions come row by row, in (sample, step, token) order: scatter the argmax back
        full = torch.cat([labels, eos.expand(B, W, 1)], dim=-1)
        predicted = torch.full_like(full, -1)
        predicted[full != IGNORE_INDEX] = logits.argmax(-1)
        pred_actions = self.decode_ids(predicted[..., :-1].unflatten(-1, (N, 7)))
        return {"loss": token_loss.mean(), "loss_sum": token_loss.sum(), "sample_loss_sum": per_sample,
                "sample_tokens": counts, "pred_actions": pred_actions}

    def count_targets(self, batch: dict) -> int:
        """What the loss averages over, for the trainer's global normalisation: chunk positions (continuous) or
        labelled tokens (discrete: 7 per valid position and one eos per step)."""
        mask = batch["action_mask"]
        if self.config.head == "discrete":
            return int(mask.sum()) * 7 + mask.shape[0] * mask.shape[1]
        return int(mask.sum())

    # ------------------------------------------------------------------ acting

    @torch.no_grad()
    def predict(self, images: torch.Tensor, input_ids, attention_mask) -> torch.Tensor:
        """The newest step's action chunk [E, N, 7] (normalised, gripper as probability of open) from a window
        of the last w <= W steps' frames [E, cams*w, 3, H, W] (static frames, then gripper frames).

        post / one-step: every step's feature is its own forward (streamvln/manip/policy.py caches them and calls
        predict_from_features); pre: the interleaved window; discrete: greedy tokens of the newest step (N = 1,
        as RoboVLMs' pred_action_discrete)."""
        cams = 2 if self.config.use_hand_rgb else 1
        steps = images.shape[1] // cams
        visual = self.step_visual(images, steps)
        if self.config.head == "discrete":
            return self._greedy_discrete(visual[:, -1:], input_ids, attention_mask)
        return self.predict_from_features(self.action_features(visual, input_ids, attention_mask))

    @torch.no_grad()
    def step_feature(self, images: torch.Tensor, input_ids, attention_mask) -> torch.Tensor:
        """One step's ACT feature [E, d] from its frames [E, cams, 3, H, W] (post and one-step histories)."""
        return self.action_features(self.step_visual(images, 1), input_ids, attention_mask, "post")[:, 0]

    @torch.no_grad()
    def predict_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """The head over the features of the window [E, w, d]: the last step's chunk [E, N, 7]."""
        arm, grip = self.run_head(features)
        return torch.cat([arm[:, -1], torch.sigmoid(grip[:, -1])[..., None]], dim=-1)

    def _greedy_discrete(self, visual, input_ids, attention_mask) -> torch.Tensor:
        text = self.model.embed_tokens(input_ids.clamp(min=0))
        lens = attention_mask.sum(1).tolist()
        chosen = torch.zeros((visual.shape[0], 0), dtype=torch.long, device=visual.device)
        for _ in range(7):  # the whole vocabulary's argmax, as RoboVLMs; out-of-range ids decode to the edge bins
            emb = self.model.embed_tokens(chosen)
            empty = torch.tensor([], dtype=torch.long, device=visual.device)
            embeds, mask, _, ends = self._rows(visual, text, lens, lambda b, t: (emb[b], empty), False)
            hidden = self.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            rows, pos = zip(*ends)
            chosen = torch.cat([chosen, self.lm_head(hidden[list(rows), list(pos)]).argmax(-1, keepdim=True)], 1)
        return self.decode_ids(chosen)[:, None]  # [E, 1, 7]
