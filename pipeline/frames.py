"""Sample frames: split an episode's actions into chunks and pick history and current frame indices."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STOP, FORWARD, LEFT, RIGHT = 0, 1, 2, 3
ACTION_IDS = (STOP, FORWARD, LEFT, RIGHT)
MIN_ACTIONS = 4  # the reference skips shorter episodes


@dataclass(frozen=True)
class Chunk:
    """One training sample's slice of an episode (before the dialogue is built)."""

    start: int
    time_ids: list[int]
    actions: list[int]
    history_frames: list[int]
    current_frames: list[int]


def count_init_turns(actions: list[int]) -> int:
    """Number of leading turn-only steps (after the -1 placeholder).

    The reference's remove_init_turns calls a helper that does not exist; this is the behaviour its
    name and use describe: drop the opening in-place rotation so chunks start where the agent moves.
    """
    valid = 0
    for action in actions[1:]:
        if action not in (LEFT, RIGHT):
            break
        valid += 1
    return valid


def history_indices(start: int, valid: int, num_history: int, mode: str) -> list[int]:
    """Frame indices of the history shown before chunk `start` (empty for the first chunk).

    mode "reference": arange(valid, start + valid, max(start // H, 1)), which gives more than H frames
    whenever start is not a multiple of H (e.g. F=30, H=8 gives 10) while the model assumes H.
    mode "exact" (default): min(H, start) evenly spaced frames, valid + floor(j * start / n). It equals
    the reference whenever the reference gives at most H frames, so the defaults are unchanged.
    """
    if start == 0:
        return []
    if mode == "reference":
        return list(range(valid, start + valid, max(start // num_history, 1)))
    if mode != "exact":
        raise ValueError(f"history mode must be 'exact' or 'reference', got {mode!r}")
    n = min(num_history, start)
    return [valid + (j * start) // n for j in range(n)]


def plan_chunks(
    actions: list[int],
    *,
    num_frames: int = 32,
    num_future_steps: int = 4,
    num_history: int = 8,
    remove_init_turns: bool = False,
    history_mode: str = "exact",
) -> list[Chunk]:
    """All chunks of one episode, as the reference builds them (section 2).

    Returns [] for an episode the reference would skip (fewer than 4 actions, or fewer than 4 left
    after removing the initial turns); the caller records why.
    """
    if len(actions) < MIN_ACTIONS:
        return []
    valid = count_init_turns(actions) if remove_init_turns else 0
    length = len(actions) - valid
    if length < MIN_ACTIONS:
        return []
    acts = list(actions[1 + valid :]) + [STOP]
    chunks = []
    for start in range(0, length + 1, num_frames):
        if start == length:
            continue
        time_ids = list(range(start, min(start + num_frames, length)))
        current = np.arange(time_ids[0] + valid, time_ids[-1] + 1 + valid, num_future_steps)
        chunks.append(
            Chunk(
                start=start,
                time_ids=time_ids,
                actions=[acts[t] for t in time_ids],
                history_frames=history_indices(start, valid, num_history, history_mode),
                current_frames=[int(i) for i in current],
            )
        )
    return chunks


def skip_reason(actions: list[int], remove_init_turns: bool) -> str:
    """Why plan_chunks returned no chunks for these actions."""
    if len(actions) < MIN_ACTIONS:
        return f"too short: {len(actions)} actions, need at least {MIN_ACTIONS}"
    valid = count_init_turns(actions) if remove_init_turns else 0
    return (
        f"too short after removing {valid} initial turns: {len(actions) - valid} actions left, "
        f"need at least {MIN_ACTIONS}"
    )
