"""Log-probabilities of token sequences under a decision's exact context, batched, with gradients (B4, B5 fixed).

A context is the list of pieces the streaming agent built the decision from (its window's turns
with their frames, and the answers fed back), so the recomputed probability is the one the tokens
were chosen under, not a re-prompted approximation. Sequences are right-padded and each one's
logits are read at its own positions, never at a pad.
"""

from __future__ import annotations

import torch


def sequence_logprobs(agent, items: list[tuple[list, list, list[int]]], temperature: float):
    """items: (frames, context pieces, target tokens). Returns (sum of log pi(token) at `temperature`
    [B], mean entropy over the target positions [B], mean per-token NLL at temperature 1 [B])."""
    model = agent.net
    seqs, spans = [], []
    for frames, pieces, tokens in items:
        context = agent.embed_pieces(frames, pieces)
        fed = tokens[:-1]
        extra = model.model.embed_tokens(torch.tensor(fed, device=agent.device)) if fed else context[:0]
        seqs.append(torch.cat([context, extra]))
        spans.append((context.shape[0] - 1, len(tokens)))
    length = max(s.shape[0] for s in seqs)
    x = seqs[0].new_zeros((len(seqs), length, seqs[0].shape[-1]))
    mask = torch.zeros((len(seqs), length), dtype=torch.long, device=agent.device)
    for k, s in enumerate(seqs):
        x[k, : s.shape[0]], mask[k, : s.shape[0]] = s, 1
    hidden = model.model(inputs_embeds=x, attention_mask=mask).last_hidden_state
    logps, entropies, nlls = [], [], []
    for k, ((start, m), (_, _, tokens)) in enumerate(zip(spans, items)):
        logits = model.lm_head(hidden[k, start : start + m]).float()
        target = torch.tensor(tokens, device=agent.device)
        scaled = torch.log_softmax(logits / temperature, -1)
        logps.append(scaled.gather(1, target[:, None]).sum())
        # a restricted output vocabulary scores other tokens -inf: their p log p is 0 (not 0 x -inf = nan),
        # and with a finite stand-in for -inf no nan reaches the gradient either
        finite = scaled.masked_fill(torch.isinf(scaled), 0.0)
        entropies.append(-(scaled.exp() * finite).sum(-1).mean())
        nlls.append(-torch.log_softmax(logits, -1).gather(1, target[:, None]).mean())
    return torch.stack(logps), torch.stack(entropies), torch.stack(nlls)
