"""Log-probabilities of token sequences under a decision's exact context, batched, with gradients (B4, B5 fixed).

A context is the list of pieces the streaming agent built the decision from (its window's turns
with their frames, and the answers fed back), so the recomputed probability is the one the tokens
were chosen under, not a re-prompted approximation. Sequences are right-padded and each one's
logits are read at its own positions, never at a pad.
"""

from __future__ import annotations

import torch


def _extends(a, b) -> bool:
    """Whether decision b comes later in decision a's window: b's context is a's context, a's answer as fed
    back (all but its last token, which opens the next turn), then more turns."""
    (frames_a, pieces_a, tokens_a), (frames_b, pieces_b, _) = a, b
    fed = list(tokens_a[:-1])
    n = len(pieces_a)
    if frames_a is not frames_b or len(pieces_b) <= n + bool(fed):
        return False
    if not all(x is y for x, y in zip(pieces_a, pieces_b)):  # the agent shares its piece objects
        return False
    return not fed or (pieces_b[n][0] == "gen" and list(pieces_b[n][1]) == fed)


def chains(items) -> list[list[int]]:
    """Item indices grouped into chains: a window's successive decisions, each extending the one before, so
    that one forward over the chain's last context and answer gives every member's logits (causal
    attention: a position never sees what follows it). Items that extend nothing form chains of one."""
    by_window = {}
    for i, (frames, pieces, _) in enumerate(items):
        by_window.setdefault((id(frames), id(pieces[0]) if pieces else i), []).append(i)
    out = []
    for members in by_window.values():
        members.sort(key=lambda i: len(items[i][1]))
        chain = [members[0]]
        for i in members[1:]:
            if _extends(items[chain[-1]], items[i]):
                chain.append(i)
            else:
                out.append(chain)
                chain = [i]
        out.append(chain)
    return out


def sequence_logprobs(agent, items: list[tuple[list, list, list[int]]], temperature: float):
    """items: (frames, context pieces, target tokens). Returns (sum of log pi(token) at `temperature`
    [B], mean entropy over the target positions [B], mean per-token NLL at temperature 1 [B]).
    A window's decisions in `items` share one forward (chains); each item's numbers are its own."""
    model = agent.net
    seqs, spans = [], [None] * len(items)
    for chain in chains(items):
        frames, pieces, tokens = items[chain[-1]]
        parts = agent.embed_each_piece(frames, pieces)
        fed = tokens[:-1]
        if fed:
            parts.append(model.model.embed_tokens(torch.tensor(fed, device=agent.device)))
        lengths = [p.shape[0] for p in parts]
        for k in chain:  # item k's context is the chain's first len(its pieces) pieces
            spans[k] = (len(seqs), sum(lengths[: len(items[k][1])]) - 1, len(items[k][2]))
        seqs.append(torch.cat(parts))
    length = max(s.shape[0] for s in seqs)
    x = seqs[0].new_zeros((len(seqs), length, seqs[0].shape[-1]))
    mask = torch.zeros((len(seqs), length), dtype=torch.long, device=agent.device)
    for k, s in enumerate(seqs):
        x[k, : s.shape[0]], mask[k, : s.shape[0]] = s, 1
    hidden = model.model(inputs_embeds=x, attention_mask=mask).last_hidden_state
    logps, entropies, nlls = [], [], []
    for (row, start, m), (_, _, tokens) in zip(spans, items):
        logits = model.lm_head(hidden[row, start : start + m]).float()
        target = torch.tensor(tokens, device=agent.device)
        scaled = torch.log_softmax(logits / temperature, -1)
        logps.append(scaled.gather(1, target[:, None]).sum())
        # a restricted output vocabulary scores other tokens -inf: their p log p is 0 (not 0 x -inf = nan),
        # and with a finite stand-in for -inf no nan reaches the gradient either
        finite = scaled.masked_fill(torch.isinf(scaled), 0.0)
        entropies.append(-(scaled.exp() * finite).sum(-1).mean())
        nlls.append(-torch.log_softmax(logits, -1).gather(1, target[:, None]).mean())
    return torch.stack(logps), torch.stack(entropies), torch.stack(nlls)
