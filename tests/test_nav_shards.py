"""End to end: sources -> shards/nav; read back with webdataset and tarfile, index, manifest, determinism, resume."""

import io
import json
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.config import NavShardConfig
from pipeline.frames import plan_chunks
from pipeline.nav import run_nav
from pipeline.shard_writer import read_sample_bytes, referenced_frames
from pipeline.task_dir import PlanMismatch


def shard_bytes(task: Path) -> dict[str, bytes]:
    names = sorted(p.name for p in task.glob("*.tar")) + ["index.parquet", "rejects.jsonl", "manifest.json"]
    return {name: (task / name).read_bytes() for name in names}


def expected_samples(sources):
    n = 0
    for src in sources:
        for ep in json.loads((src / "annotations.json").read_text()):
            n += len(plan_chunks(ep["actions"])) * len(ep["instructions"])
    return n


def test_writes_readable_shards_with_index_and_manifest(tiny_sources, small_cfg, tokenizer_dir, tmp_path):
    summary = run_nav(tiny_sources, tmp_path / "shards", small_cfg, tokenizer_dir, progress=False)
    task = tmp_path / "shards" / "nav"
    manifest = json.loads((task / "manifest.json").read_text())["splits"]["train"]
    total = expected_samples(tiny_sources)
    assert manifest["counts"] == {"episodes_in": 7, "episodes_written": 7, "episodes_rejected": 0,
                                  "samples_written": total, "samples_rejected": 0}
    assert summary["manifest"]["counts"] == manifest["counts"]
    assert len(manifest["shards"]) > 1 and sum(s["samples"] for s in manifest["shards"]) == total
    assert manifest["options"]["image_size"] == 32 and manifest["tokenizer"]["fingerprint"]
    assert manifest["tokenizer"]["pad_token_id"] == 151643 and manifest["tokenizer"]["vocab_size"] == 151648

    # a plain webdataset reader sees every sample, and per episode one record of its frames, stored once
    urls = [str(task / s["shard"]) for s in manifest["shards"]]
    records = list(wds.WebDataset(urls, shardshuffle=False).decode())  # JPEGs stay bytes
    samples = [r for r in records if "json" in r]
    frame_records = {r["__key__"]: r for r in records if "json" not in r}
    assert len(samples) == total and sorted(frame_records) == sorted(
        f"{src.name}-{ep['id']}-frames" for src in tiny_sources for ep in json.loads((src / "annotations.json").read_text()))
    stored = {key: sorted(k for k in r if k.endswith(".jpg")) for key, r in frame_records.items()}
    assert sum(map(len, stored.values())) == sum(s["frames"] for s in manifest["shards"])
    for s in samples:
        meta = s["json"]
        assert not any(k.endswith(".jpg") for k in s)  # frames are referenced, not copied
        used = meta["history_frames"] + meta["current_frames"]
        episode_frames = stored[f"{meta['source']}-{meta['episode_id']}-frames"]
        assert {f"{i:05d}.jpg" for i in used} <= set(episode_frames)
        frames = referenced_frames(task / s["__url__"].rsplit("/", 1)[1], meta, {})
        assert len(frames) == meta["n_frames"] == len(used) == len(meta["frame_ranges"])
        assert all(np.asarray(Image.open(io.BytesIO(f))).shape == (32, 32, 3) for f in frames)
        record = frame_records[f"{meta['source']}-{meta['episode_id']}-frames"]
        assert frames == [record[f"{i:05d}.jpg"] for i in used]  # exactly the bytes of the episode's frames
        ids, labels = s["input_ids.npy"], s["labels.npy"]
        assert ids.dtype == np.int32 and labels.shape == ids.shape == (meta["n_tokens"],)
        assert (ids == -200).sum() == len(meta["current_frames"])  # one <image> per current frame
        assert (ids == -300).sum() == (1 if meta["start"] else 0)  # <memory> only after the first chunk
        assert (labels != -100).sum() == meta["n_labels"]
        assert len(meta["actions"]) == len(meta["time_ids"])

    # the index's byte ranges hold exactly each sample's members, in a plain tarfile too
    index = pq.read_table(task / "index.parquet").to_pylist()
    assert len(index) == total and len({r["key"] for r in index}) == total
    for row in index:
        members = read_sample_bytes(task / row["shard"], row["offset"], row["size"])
        meta = json.loads(members["json"])
        assert meta["key"] == row["key"] and meta["n_tokens"] == row["n_tokens"]
        assert row["n_frames"] == meta["n_frames"] and row["episode"] == meta["episode_id"]
        with tarfile.open(task / row["shard"]) as tar:
            member = tar.getmember(f"{row['key']}.json")
            assert member.offset == row["offset"]


def test_frames_are_the_indexed_source_frames(tiny_sources, small_cfg, tokenizer_dir, tmp_path):
    run_nav(tiny_sources, tmp_path / "shards", small_cfg, tokenizer_dir, progress=False)
    task = tmp_path / "shards" / "nav"
    row = next(r for r in pq.read_table(task / "index.parquet").to_pylist() if r["start"] == 64)
    members = read_sample_bytes(task / row["shard"], row["offset"], row["size"])
    meta = json.loads(members["json"])
    assert meta["history_frames"] == [0, 8, 16, 24, 32, 40, 48, 56] and meta["current_frames"][0] == 64
    frames = referenced_frames(task / row["shard"], meta, members)
    for n, index in enumerate(meta["history_frames"] + meta["current_frames"]):
        pixel = np.asarray(Image.open(io.BytesIO(frames[n])))[16, 16].astype(int)
        want = np.array([(index * 37) % 256, (index * 91) % 256, (index * 53) % 256])
        assert np.abs(pixel - want).max() <= 6, (n, index)


def test_deterministic_across_runs_workers_and_parts(tiny_sources, small_cfg, tokenizer_dir, tmp_path):
    run_nav(tiny_sources, tmp_path / "a", small_cfg, tokenizer_dir, progress=False)
    run_nav(tiny_sources, tmp_path / "b", small_cfg, tokenizer_dir, workers=2, progress=False)
    first = run_nav(tiny_sources, tmp_path / "c", small_cfg, tokenizer_dir, part=1, num_parts=2, progress=False)
    assert first["manifest"] is None and first["shards_missing"] > 0
    assert not (tmp_path / "c" / "nav" / "manifest.json").exists()  # nothing half-merged
    run_nav(tiny_sources, tmp_path / "c", small_cfg, tokenizer_dir, part=0, num_parts=2, progress=False)
    a = shard_bytes(tmp_path / "a" / "nav")
    assert a == shard_bytes(tmp_path / "b" / "nav") == shard_bytes(tmp_path / "c" / "nav")
    # another seed draws other conjunctions
    other = type(small_cfg)(**{**small_cfg.__dict__, "seed": 1})
    run_nav(tiny_sources, tmp_path / "d", other, tokenizer_dir, progress=False)
    d = shard_bytes(tmp_path / "d" / "nav")
    assert [d[k] != a[k] for k in sorted(a) if k.endswith(".tar")].count(True) >= 1


def test_resume_after_crash_redoes_only_unfinished_shards(tiny_sources, small_cfg, tokenizer_dir, tmp_path):
    run_nav(tiny_sources, tmp_path / "full", small_cfg, tokenizer_dir, progress=False)
    want = shard_bytes(tmp_path / "full" / "nav")
    task = tmp_path / "crashed" / "nav"
    run_nav(tiny_sources, tmp_path / "crashed", small_cfg, tokenizer_dir, progress=False)
    # The three states a kill can leave: a tmp tar being written (no final tar), a renamed tar whose
    # stats were not yet written, and finished shards; plus the merged files not yet written.
    (task / "train-000000.stats.json").unlink()
    (task / "train-000000.tar").rename(task / "train-000000.tar.tmp")
    (task / "train-000000.tar.tmp").write_bytes(b"half a tar")
    (task / "train-000001.stats.json").unlink()
    (task / "train-000001.tar").write_bytes(b"stale bytes that must be replaced")
    for name in ("index.parquet", "manifest.json", "rejects.jsonl"):
        (task / name).unlink()
    untouched = task / "train-000002.tar"
    before = untouched.stat().st_mtime_ns
    summary = run_nav(tiny_sources, tmp_path / "crashed", small_cfg, tokenizer_dir, progress=False)
    assert summary["shards_written"] == 2 and summary["shards_skipped"] == summary["shards_planned"] - 2
    assert untouched.stat().st_mtime_ns == before
    assert not list(task.glob("*.tmp"))
    assert shard_bytes(task) == want


@pytest.mark.slow
def test_killed_process_resumes_to_identical_output(tiny_sources, tokenizer_dir, tmp_path):
    args = [sys.executable, "-m", "pipeline.cli", "nav", *sum((["--src", str(s)] for s in tiny_sources), []),
            "--tokenizer", str(tokenizer_dir), "--image-size", "32", "--samples-per-shard", "1", "--quiet"]
    subprocess.run(args + ["--out", str(tmp_path / "full")], check=True, capture_output=True)
    proc = subprocess.Popen(args + ["--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    task = tmp_path / "killed" / "nav"
    deadline = time.monotonic() + 60
    while proc.poll() is None and not list(task.glob("*.stats.json")) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()  # SIGKILL: no cleanup runs
    proc.wait()
    subprocess.run(args + ["--out", str(tmp_path / "killed")], check=True, capture_output=True)
    assert shard_bytes(task) == shard_bytes(tmp_path / "full" / "nav")


def test_resume_with_other_options_is_refused(tiny_sources, small_cfg, tokenizer_dir, tmp_path):
    run_nav(tiny_sources, tmp_path, small_cfg, tokenizer_dir, progress=False)
    changed = type(small_cfg)(**{**small_cfg.__dict__, "num_history": 4})
    with pytest.raises(PlanMismatch, match="options"):
        run_nav(tiny_sources, tmp_path, changed, tokenizer_dir, progress=False)
    summary = run_nav(tiny_sources, tmp_path, changed, tokenizer_dir, overwrite=True, progress=False)
    assert summary["manifest"]["options"]["num_history"] == 4


def test_cli_nav_and_merge(tiny_sources, tokenizer_dir, tmp_path):
    base = ["nav", *sum((["--src", str(s)] for s in tiny_sources), []), "--tokenizer", str(tokenizer_dir),
            "--out", str(tmp_path), "--config", "configs/shards/nav.yaml", "--image-size", "32",
            "--samples-per-shard", "4", "--quiet"]
    result = CliRunner().invoke(main, base + ["--part", "0", "--num-parts", "2"])
    assert result.exit_code == 0, result.output
    assert "still to be written by other parts" in result.output
    assert CliRunner().invoke(main, ["merge", str(tmp_path / "nav")]).exit_code != 0
    result = CliRunner().invoke(main, base + ["--part", "1", "--num-parts", "2"])
    assert result.exit_code == 0 and "episodes: 7 in = 7 written + 0 rejected" in result.output
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "nav")])
    assert result.exit_code == 0 and "merged train" in result.output
    bad = CliRunner().invoke(main, base + ["--part", "2", "--num-parts", "2"])
    assert bad.exit_code != 0 and "--part must be in 0..1" in bad.output


def test_train_and_val_splits_share_a_task_folder(tiny_sources, small_cfg, tokenizer_dir, tmp_path):
    run_nav(tiny_sources[:1], tmp_path, small_cfg, tokenizer_dir, progress=False)
    val = type(small_cfg)(**{**small_cfg.__dict__, "split": "val"})
    run_nav(tiny_sources[1:], tmp_path, val, tokenizer_dir, progress=False)
    manifest = json.loads((tmp_path / "nav" / "manifest.json").read_text())
    assert set(manifest["splits"]) == {"train", "val"}
    index = pq.read_table(tmp_path / "nav" / "index.parquet").to_pylist()
    assert {r["split"] for r in index} == {"train", "val"}
    assert all(r["shard"].startswith(r["split"] + "-") for r in index)
    assert {r["source"] for r in index if r["split"] == "val"} == {"RxR"}


def test_frames_once_per_episode_give_the_same_batches_as_copies_per_sample(tiny_sources, tokenizer_dir, tmp_path):
    """frame_storage episode (schema 3) vs sample (every sample its own copies, as schema 2): the loader
    yields identical batches; the episode layout stores each used frame once and is smaller."""
    from streamvln.data import MixConfig, TaskMix, build_loader
    from streamvln.data.shards import load_task

    sizes, batches = {}, {}
    for storage in ("episode", "sample"):
        cfg = NavShardConfig(image_size=32, samples_per_shard=4, frame_storage=storage)
        run_nav(tiny_sources, tmp_path / storage, cfg, tokenizer_dir, progress=False)
        manifest = json.loads((tmp_path / storage / "nav" / "manifest.json").read_text())
        sizes[storage] = (sum(s["bytes"] for s in manifest["splits"]["train"]["shards"]),
                          sum(s["frames"] for s in manifest["splits"]["train"]["shards"]))
        mix = MixConfig(tasks=[TaskMix("nav", [str(tmp_path / storage / "nav")])], image_size=32, batch_size=3,
                        finite=True)
        batches[storage] = list(build_loader(mix))
    index = pq.read_table(tmp_path / "episode" / "nav" / "index.parquet").to_pylist()
    used = sum(r["n_frames"] for r in index)
    assert sizes["sample"][1] == used  # a copy per use
    per_episode = {}
    for row in index:
        members = read_sample_bytes(tmp_path / "episode" / "nav" / row["shard"], row["offset"], row["size"])
        meta = json.loads(members["json"])
        per_episode.setdefault((row["source"], row["episode"]), set()).update(
            meta["history_frames"] + meta["current_frames"])
    assert sizes["episode"][1] == sum(map(len, per_episode.values())) < used  # each used frame once
    assert sizes["episode"][0] < sizes["sample"][0]
    assert len(batches["episode"]) == len(batches["sample"]) > 0
    for a, b in zip(batches["episode"], batches["sample"]):
        assert a["keys"] == b["keys"]
        for k in ("input_ids", "labels", "images", "time_ids", "n_history"):
            assert torch.equal(a[k], b[k]), k
    # schema 2 folders (copies per sample) are read as they are; older ones are refused, saying why
    manifest_path = tmp_path / "sample" / "nav" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "schema_version": 2}))
    assert len(load_task("nav", [str(tmp_path / "sample" / "nav")], "train")) == len(index)
    manifest_path.write_text(json.dumps({**manifest, "schema_version": 1}))
    with pytest.raises(ValueError, match="schema version 1; this loader reads 2, 3: write them again"):
        load_task("nav", [str(tmp_path / "sample" / "nav")], "train")


def test_describe_puts_each_frames_description_before_its_actions(tmp_path, tokenizer_dir, tok):
    """`describe: true` (beyond the reference): every answer is "In view: <its frame's description> <actions>",
    labelled like the actions; an episode without descriptions is rejected with the reason, and counts add up.
    Off (the default), the same source gives the reference's answers: the descriptions are not read."""
    from conftest import episode, write_source

    described = episode(1, 9, ("Walk to the red ball and stop next to it.",))
    described["descriptions"] = [f"red ball {'left' if i % 2 else 'ahead'}." for i in range(9)]
    src = write_source(tmp_path / "data", "SimRoom", [described, episode(2, 6)])
    cfg = NavShardConfig(image_size=32, samples_per_shard=4, describe=True)
    run_nav([src], tmp_path / "on", cfg, tokenizer_dir, progress=False)
    run_nav([src], tmp_path / "off", NavShardConfig(image_size=32, samples_per_shard=4), tokenizer_dir, progress=False)

    def samples(root):
        task = root / "nav"
        urls = sorted(str(p) for p in task.glob("*.tar"))
        return [r for r in wds.WebDataset(urls, shardshuffle=False).decode() if "json" in r], task

    on, task = samples(tmp_path / "on")
    counts = json.loads((task / "manifest.json").read_text())["splits"]["train"]["counts"]
    assert counts["episodes_in"] == 2 and counts["episodes_written"] == 1 and counts["episodes_rejected"] == 1
    rejects = [json.loads(line) for line in (task / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and "no descriptions" in rejects[0]["reason"]
    (sample,) = on
    meta = sample["json"]
    ids, labels = np.asarray(sample["input_ids.npy"]), np.asarray(sample["labels.npy"])
    text = tok.decode(ids[ids >= 0])
    answers = [a.split("<|im_end|>")[0] for a in text.split("<|im_start|>assistant\n")[1:]]
    symbols = {1: "↑", 2: "←", 3: "→", 0: "STOP"}
    expected = [f"In view: {described['descriptions'][f]} "
                + "".join(symbols[a] for a in meta["actions"][4 * j: 4 * j + 4])
                for j, f in enumerate(meta["current_frames"])]
    assert answers == expected
    assert "In view: red ball" in tok.decode(labels[labels >= 0])  # the description is taught, not only shown
    off, _ = samples(tmp_path / "off")
    assert len(off) == 2 and all("In view" not in tok.decode(np.asarray(r["input_ids.npy"])[
        np.asarray(r["input_ids.npy"]) >= 0]) for r in off)


def test_describe_decoys_swap_the_goal_colour_and_label_only_the_descriptions(tmp_path, tokenizer_dir, tok):
    """`describe_decoys`: one more stream per instruction whose colour word is another of decoy_words; its answers
    are the same text, but only the descriptions (and the turn tokens) are labelled, never an action symbol."""
    from conftest import episode, write_source

    described = episode(1, 9, ("Walk to the red ball and stop next to it.",))
    described["descriptions"] = [f"red ball {'left' if i % 2 else 'ahead'}." for i in range(9)]
    src = write_source(tmp_path / "data", "SimRoom", [described])
    cfg = NavShardConfig(image_size=32, samples_per_shard=4, describe=True, describe_decoys=1,
                         decoy_words=["red", "green", "blue"])
    run_nav([src], tmp_path / "out", cfg, tokenizer_dir, progress=False)
    urls = sorted(str(p) for p in (tmp_path / "out" / "nav").glob("*.tar"))
    samples = {r["json"]["key"]: r for r in wds.WebDataset(urls, shardshuffle=False).decode() if "json" in r}
    plain, decoy = samples["SimRoom-1-i0-s0000"], samples["SimRoom-1-i0d0-s0000"]
    assert decoy["json"]["decoy"] is True and "decoy" not in plain["json"]
    assert decoy["json"]["instruction"] in ("Walk to the green ball and stop next to it.",
                                            "Walk to the blue ball and stop next to it.")

    def labelled(sample):
        labels = np.asarray(sample["labels.npy"])
        return tok.decode(labels[labels >= 0])

    assert "In view: red ball ahead." in labelled(decoy) and not set("↑←→") & set(labelled(decoy))
    assert "STOP" not in labelled(decoy) and "STOP" in labelled(plain) and "↑" in labelled(plain)
    # the same labelled text as the plain stream's, less each answer's actions (with the space before them)
    assert labelled(decoy) == re.sub(r" [↑←→]+(?:STOP)?| STOP", "", labelled(plain))
    with pytest.raises(Exception, match="decoy_words"):
        NavShardConfig(describe_decoys=1, describe=True, decoy_words=["red"]).validate()
