"""Sample packing: a batch's embedded samples laid end to end in rows up to a token budget, positions restarting.

Packing works on the language model's input, after each sample's frames have been spliced in. Only
there is a sample's true length known: its text plus its visual tokens. The rows are filled in sample
order (next fit), so labelled tokens keep the unpacked order. Each sample's position ids restart at 0.
transformers reads the restarts as packed sequences: a block-diagonal causal mask under SDPA and the
varlen kernels under flash-attention 2. Attention therefore never crosses samples (tests/test_packing.py
compares losses and gradients with the unpacked batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.tokens import IGNORE_INDEX


@dataclass
class Packed:
    embeds: torch.Tensor  # [R, L, D]
    labels: torch.Tensor  # [R, L]; each sample's first position is -100 (it would be the previous one's target)
    position_ids: torch.Tensor  # [R, L]; restart at 0 for each sample, and for the trailing padding
    sample: torch.Tensor  # [R, L]; the batch index of the sample at each position, -1 on padding
    tokens: int  # real tokens (the samples' lengths summed)


def plan_rows(lengths: list[int], budget: int) -> list[list[int]]:
    """Sample indices per row: consecutive samples while they fit in `budget`; a longer sample gets a row alone."""
    rows, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if current and used + n > budget:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(current)
    return rows


def pack(embeds: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, budget: int) -> Packed:
    """Right-padded per-sample rows (embed_multimodal's output) -> packed rows of at most `budget` tokens
    (a sample longer than the budget is never cut: its row is as long as it is)."""
    lengths = mask.sum(1).tolist()
    rows = plan_rows(lengths, budget)
    width = max(sum(lengths[i] for i in row) for row in rows)
    r, dim = len(rows), embeds.shape[-1]
    out = embeds.new_zeros((r, width, dim))
    out_labels = labels.new_full((r, width), IGNORE_INDEX)
    sample = torch.full((r, width), -1, dtype=torch.long, device=embeds.device)
    positions = torch.zeros((r, width), dtype=torch.long, device=embeds.device)
    for k, row in enumerate(rows):
        start = 0
        for i in row:
            n = lengths[i]
            out[k, start : start + n] = embeds[i, :n]
            out_labels[k, start : start + n] = labels[i, :n]
            out_labels[k, start] = IGNORE_INDEX  # never a target: unpacked, position 0 predicts nothing
            sample[k, start : start + n] = i
            positions[k, start : start + n] = torch.arange(n, device=embeds.device)
            start += n
        positions[k, start:] = torch.arange(width - start, device=embeds.device)  # padding: a segment of its own
    return Packed(out, out_labels, positions, sample, int(sum(lengths)))
