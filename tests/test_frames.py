"""Chunking and frame indices, against the reference's formulas on edge-case episode lengths."""

import numpy as np
import pytest

from pipeline.frames import count_init_turns, history_indices, plan_chunks, skip_reason


def reference_chunks(actions, F=32, K=4, H=8):
    """The reference's sample construction, transcribed literally (valid = 0)."""
    L = len(actions)
    if L < 4:
        return []
    acts = actions[1:] + [0]
    out = []
    for start in [n * F for n in range(L // F + 1) if n * F != L]:
        time_ids = np.arange(start, min(start + F, L))
        current = np.arange(time_ids[0], time_ids[-1] + 1, K)
        history = np.arange(0, start, max(start // H, 1)) if start != 0 else np.array([], int)
        out.append((start, time_ids.tolist(), [acts[t] for t in time_ids], history.tolist(), current.tolist()))
    return out


@pytest.mark.parametrize("n", [4, 5, 31, 32, 33, 63, 64, 65, 100])
def test_chunks_match_reference(n):
    actions = [-1] + [1 + i % 3 for i in range(n - 1)]
    ours = [(c.start, c.time_ids, c.actions, c.history_frames, c.current_frames) for c in plan_chunks(actions)]
    assert ours == reference_chunks(actions)


def test_chunk_edge_cases_by_hand():
    assert plan_chunks([-1, 1, 1]) == []  # fewer than 4 actions: skipped
    four = plan_chunks([-1, 1, 2, 3])
    assert [c.start for c in four] == [0]
    assert four[0].actions == [1, 2, 3, 0]  # STOP appended
    assert four[0].current_frames == [0]
    assert [c.start for c in plan_chunks([-1] + [1] * 31)] == [0]  # 32 actions: start 32 == L is dropped
    c33 = plan_chunks([-1] + [1] * 32)
    assert [c.start for c in c33] == [0, 32]
    assert c33[1].time_ids == [32] and c33[1].actions == [0] and c33[1].current_frames == [32]
    assert c33[1].history_frames == [0, 4, 8, 12, 16, 20, 24, 28]
    c64 = plan_chunks([-1] + [1] * 63)
    assert [c.start for c in c64] == [0, 32]
    c65 = plan_chunks([-1] + [1] * 64)
    assert [c.start for c in c65] == [0, 32, 64]
    assert c65[2].history_frames == [0, 8, 16, 24, 32, 40, 48, 56]
    assert c65[1].current_frames == [32, 36, 40, 44, 48, 52, 56, 60]
    # one current frame per group of K actions, so per assistant turn
    for c in c65:
        assert len(c.current_frames) == -(-len(c.actions) // 4)


def test_history_exact_mode_keeps_h_frames_where_reference_gives_more():
    # F = 30 is not a multiple of H = 8: the reference's arange gives 10 history frames at start 30.
    assert len(history_indices(30, 0, 8, "reference")) == 10
    exact = history_indices(30, 0, 8, "exact")
    assert len(exact) == 8 and exact == sorted(set(exact)) and exact[0] == 0 and exact[-1] < 30
    # where the reference gives at most H frames, both modes agree
    for start in (32, 64, 96, 4, 7, 8, 16):
        assert history_indices(start, 3, 8, "exact") == history_indices(start, 3, 8, "reference")
    chunks = plan_chunks([-1] + [1] * 70, num_frames=30, history_mode="exact")
    assert all(len(c.history_frames) == 8 for c in chunks[1:])
    chunks = plan_chunks([-1] + [1] * 70, num_frames=30, history_mode="reference")
    assert [len(c.history_frames) for c in chunks[1:]] == [10, 9]  # starts 30 and 60


def test_remove_init_turns():
    actions = [-1, 2, 2, 3, 1, 1, 2, 1, 1, 1]
    assert count_init_turns(actions) == 3
    chunks = plan_chunks(actions, remove_init_turns=True)
    assert len(chunks) == 1
    (c,) = chunks
    assert c.actions == [1, 1, 2, 1, 1, 1, 0]  # the three opening turns are gone, STOP appended
    assert c.current_frames == [3, 7]  # frame indices shifted by the removed steps
    # with history: indices start at `valid`
    long = [-1, 3, 3] + [1] * 40
    chunks = plan_chunks(long, remove_init_turns=True)
    assert chunks[1].start == 32 and chunks[1].history_frames == [2, 6, 10, 14, 18, 20 + 2, 26, 30]
    assert chunks[1].current_frames == [34, 38, 42]  # 9 actions: 3 turns
    # without the option nothing is removed
    assert plan_chunks(actions)[0].actions[:3] == [2, 2, 3]


def test_remove_init_turns_can_leave_too_few_actions():
    actions = [-1, 2, 3, 2, 3, 2, 1]
    assert plan_chunks(actions, remove_init_turns=True) == []
    assert "after removing 5 initial turns" in skip_reason(actions, True)
    assert "too short: 3 actions" in skip_reason([-1, 1, 1], False)
