"""Action heads of the VLA model (RoboVLMs' policy heads): LSTM, FC and GPT-2 over per-step features; the losses.

Each head maps per-step action features [B, T, d] to an arm chunk [B, T, N, 6] (tanh, in the
normalised action space) and gripper logits [B, T, N] (open = 1). The discrete head is the language
model's own logits over the action tokens (streamvln/model/vla.py) and has no module here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2Model

HEADS = ("lstm", "fc", "gpt", "discrete")


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ActionOutputs(nn.Module):
    """RoboVLMs' MLPTanhHead (arm) and MLPSigmoidHead (gripper, returning logits): hidden -> h -> h/2 -> h/4 -> out.

    With hidden 1024 these are its 1024-1024-512-256 sizes."""

    def __init__(self, hidden: int, chunk: int):
        super().__init__()
        widths = [hidden, hidden, hidden // 2, hidden // 4]
        self.chunk = chunk
        self.arm = mlp(widths + [6 * chunk])
        self.gripper = mlp(widths + [chunk])

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        arm = torch.tanh(self.arm(h)).unflatten(-1, (self.chunk, 6))
        return arm, self.gripper(h)


class LSTMHead(nn.Module):
    """nn.LSTM over the window's features (RoboVLMs: hidden 1024, 4 layers, no dropout), then the outputs."""

    def __init__(self, d: int, hidden: int, layers: int, chunk: int):
        super().__init__()
        self.rnn = nn.LSTM(d, hidden, num_layers=layers, batch_first=True)
        self.out = ActionOutputs(hidden, chunk)

    def forward(self, features: torch.Tensor):
        return self.out(self.rnn(features)[0])


class FCHead(nn.Module):
    """No temporal fusion: an MLP d -> d/2 -> hidden per step, then the outputs."""

    def __init__(self, d: int, hidden: int, chunk: int):
        super().__init__()
        self.proj = nn.Sequential(mlp([d, max(1, d // 2), hidden]), nn.ReLU())
        self.out = ActionOutputs(hidden, chunk)

    def forward(self, features: torch.Tensor):
        return self.out(self.proj(features))


class GPTHead(nn.Module):
    """A causal GPT-2 (transformers' GPT2Model, learned positions, n_positions = W) over the features."""

    def __init__(self, d: int, hidden: int, layers: int, heads: int, window: int, chunk: int):
        super().__init__()
        self.proj = nn.Linear(d, hidden) if d != hidden else nn.Identity()
        config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=window, vocab_size=1,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
        self.gpt = GPT2Model(config)
        self.out = ActionOutputs(hidden, chunk)

    def forward(self, features: torch.Tensor):
        return self.out(self.gpt(inputs_embeds=self.proj(features)).last_hidden_state)


def build_head(config) -> nn.Module | None:
    d, h, n = config.hidden_size, config.head_hidden, config.chunk
    if config.head == "lstm":
        head = LSTMHead(d, h, config.lstm_layers, n)
    elif config.head == "fc":
        head = FCHead(d, h, n)
    elif config.head == "gpt":
        head = GPTHead(d, h, config.gpt_layers, config.gpt_heads, config.window, n)
    else:
        return None
    for m in head.modules():  # RoboVLMs: Xavier weights, zero biases
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return head


def continuous_loss(arm: torch.Tensor, gripper_logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                    arm_loss: str, gripper_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per chunk position: Huber (delta 1) or MSE over the 6 arm dims (their mean) + gripper_weight x BCE with
    logits on the gripper, zero where the mask is off. Returns (loss per position [B, W, N], valid positions)."""
    fn = F.huber_loss if arm_loss == "huber" else F.mse_loss
    arm_part = fn(arm.float(), target[..., :6], reduction="none").mean(-1)
    grip_part = F.binary_cross_entropy_with_logits(gripper_logits.float(), target[..., 6], reduction="none")
    per_position = (arm_part + gripper_weight * grip_part) * mask
    return per_position, mask
