"""CALVIN-format data: the restricted unpickler, the reader's windows, chunks and masks, action processing."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from pipeline.calvin import (ActionTokenizer, CalvinError, action_chunks, denormalize_actions, normalize_actions,
                             read_split, span_windows)
from pipeline.safe_pickle import UnsafePickle, load_pickled_npy


def write_calvin(folder, frames=30, spans=((2, 12), (15, 20))):
    """A hand-written split: frame f's rel_action is [f/100, -f/100, 0.7, -0.7, 0.3, 0, +-1]."""
    folder.mkdir(parents=True)
    for f in range(frames):
        rel = np.array([f / 100, -f / 100, 0.7, -0.7, 0.3, 0.0, 1.0 if f % 2 else -1.0], np.float32)
        np.savez(folder / f"episode_{f:07d}.npz", rgb_static=np.full((20, 20, 3), f, np.uint8),
                 rgb_gripper=np.full((8, 8, 3), f, np.uint8), robot_obs=np.zeros(15, np.float32),
                 scene_obs=np.zeros(24, np.float32), rel_actions=rel, actions=rel)
    (folder / "lang_annotations").mkdir()
    ann = {"info": {"indx": list(spans)}, "language": {"ann": [f"do thing {i}" for i in range(len(spans))],
                                                       "task": [f"task_{i}" for i in range(len(spans))],
                                                       "emb": np.zeros((len(spans), 1, 8), np.float32)}}
    np.save(folder / "lang_annotations" / "auto_lang_ann.npy", ann, allow_pickle=True)
    return folder


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/streamvln-calvin-pwned",))


def test_restricted_unpickler_reads_the_annotation_and_refuses_code(tmp_path):
    split = write_calvin(tmp_path / "training")
    ann = load_pickled_npy(split / "lang_annotations" / "auto_lang_ann.npy")
    assert ann["info"]["indx"] == [(2, 12), (15, 20)] and ann["language"]["emb"].shape == (2, 1, 8)
    marker = "/tmp/streamvln-calvin-pwned"
    if os.path.exists(marker):
        os.unlink(marker)
    np.save(tmp_path / "bad.npy", {"info": Boom()}, allow_pickle=True)
    with pytest.raises(UnsafePickle, match="refused to load global posix.system"):
        load_pickled_npy(tmp_path / "bad.npy")
    assert not os.path.exists(marker)
    (tmp_path / "cut.npy").write_bytes((split / "lang_annotations" / "auto_lang_ann.npy").read_bytes()[:200])
    with pytest.raises(pickle.UnpicklingError, match="cannot read the pickled payload"):
        load_pickled_npy(tmp_path / "cut.npy")
    np.save(tmp_path / "plain.npy", np.arange(4))  # numeric arrays load as np.load does
    assert load_pickled_npy(tmp_path / "plain.npy").tolist() == [0, 1, 2, 3]


def test_reader_windows_chunks_and_masks_worked_out_by_hand(tmp_path):
    split = read_split(write_calvin(tmp_path / "training"))
    assert (split.prefix, split.digits) == ("episode_", 7)
    assert split.frame_path(12).name == "episode_0000012.npz"
    assert [(s.start, s.end, s.task, s.instruction) for s in split.spans] == [
        (2, 12, "task_0", "do thing 0"), (15, 20, "task_1", "do thing 1")]
    W, N = 4, 3
    first = span_windows(split.spans[0], W, N)
    assert [idx for idx, _, _ in first] == [2, 3, 4, 5, 6, 7, 8]  # range(s, e + 1 - W)
    assert [idx for idx, _, _ in span_windows(split.spans[1], W, N)] == [15, 16]
    idx, ids, valid = first[-1]
    assert ids.tolist() == [8, 9, 10, 11, 12, 12] and valid.tolist() == [True] * 5 + [False]
    rel = np.stack([np.load(split.frame_path(int(f)))["rel_actions"] for f in ids])
    chunks, mask = action_chunks(rel, valid, W, N)
    assert chunks.shape == (4, 3, 7) and mask.shape == (4, 3)
    assert chunks[3, :, 0].tolist() == pytest.approx([0.11, 0.12, 0.12])  # t = 3: frames 11, 12, padding
    # the span's last frame (12) is trained on; RoboVLMs masks it (idx + j >= e)
    assert mask[3].tolist() == [True, True, False] and mask[2].tolist() == [True, True, True]
    assert first[0][2].all()  # a window well inside the span: everything valid


def test_action_normalisation_and_its_inverse():
    a = np.array([[0.7, -0.7, 0.3, 0.0, 0.65, -0.2, -1.0], [0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]], np.float32)
    n = normalize_actions(a)
    # clip to +-0.65, then 2 (a + 0.65) / 1.3 - 1; gripper -1 -> 0, +1 -> 1
    assert n[0].tolist() == pytest.approx([1.0, -1.0, 0.3 / 0.65, 0.0, 1.0, -0.2 / 0.65, 0.0], abs=1e-6)
    assert n[1, 6] == 1.0
    back = denormalize_actions(n)
    assert back[0].tolist() == pytest.approx([0.65, -0.65, 0.3, 0.0, 0.65, -0.2, -1.0], abs=1e-6)
    q01, q99 = [-0.02, -0.04, -0.02, -0.08, -0.09, -0.2, 0], [0.02, 0.04, 0.04, 0.08, 0.08, 0.2, 1]
    q = normalize_actions(np.array([0.0, 0.04, 0.5, -0.08, 0.0, 0.0, 1.0]), "q99", q01, q99)
    assert q.tolist() == pytest.approx([0.0, 1.0, 1.0, -1.0, 2 * 0.09 / 0.17 - 1, 0.0, 1.0], abs=1e-5)
    with pytest.raises(ValueError, match="unknown action normalisation"):
        normalize_actions(a, "zscore")


def test_discretisation_round_trip_and_token_mapping(tokenizer_dir):
    from pipeline.qwen_tokenizer import load_tokenizer

    tok = ActionTokenizer.for_tokenizer(load_tokenizer(tokenizer_dir))
    first, last = tok.id_range
    # RoboVLMs' formula: vocab_size 151643 - len("<|endoftext|>") x 3 (eos, unk, pad) - 10
    assert tok.orig == 151643 - 39 - 10 and (first, last) == (tok.orig - 256, tok.orig - 1)
    a = np.linspace(-1, 1, 1001)
    ids = tok.encode(a)
    assert ids.min() >= first and ids.max() <= last
    assert np.all(np.diff(ids) <= 0)  # higher values, lower ids
    assert np.abs(tok.decode(ids) - a).max() <= (2 / 255) / 2 + 1e-9  # within half a bin
    assert np.allclose(tok.decode(tok.encode(tok.centers)), tok.centers)  # bin centres round-trip exactly
    assert tok.encode(np.array([5.0, -5.0])).tolist() == tok.encode(np.array([1.0, -1.0])).tolist()  # clipped


def test_unreadable_splits_are_clear_errors(tmp_path):
    with pytest.raises(CalvinError, match="not a folder"):
        read_split(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalvinError, match="no frame files"):
        read_split(tmp_path / "empty")
    split = write_calvin(tmp_path / "training")
    (split / "lang_annotations" / "auto_lang_ann.npy").unlink()
    with pytest.raises(CalvinError, match="no lang_annotations/auto_lang_ann.npy"):
        read_split(split)
    np.save(split / "lang_annotations" / "auto_lang_ann.npy", {"info": {}}, allow_pickle=True)
    with pytest.raises(CalvinError, match="not a CALVIN language annotation"):
        read_split(split)
