"""End to end: video QA, ScanQA and MMC4 sources -> shards; bad inputs, determinism, workers, parts, resume, CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from click.testing import CliRunner

from conftest import write_mp4
from pipeline.cli import main
from pipeline.config import MMC4ShardConfig, ScanQAShardConfig, VideoQAShardConfig
from pipeline.convo_reader import load_data_config
from pipeline.cotrain import run_cotrain
from pipeline.synth_cotrain import write_cotrain_demo
from streamvln.data.shards import SampleReader, load_task

CONFIGS = {"videoqa": VideoQAShardConfig, "scanqa": ScanQAShardConfig, "mmc4": MMC4ShardConfig}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cotrain")
    write_cotrain_demo(root, count=12, val_count=4, seed=3)
    return root


def demo_inputs(demo: Path, task: str):
    """(inputs, media root) of the demo's training files for `task`."""
    if task == "videoqa":
        return [(s.json_path, s) for s in load_data_config(demo / "videoqa" / "data_config.yaml")], demo / "videoqa" / "videos"
    if task == "scanqa":
        return [(demo / "scanqa" / "scanqa.json", None), (demo / "scanqa" / "sqa3d.json", None)], demo / "scanqa" / "scenes"
    return [(demo / "mmc4" / "docs.jsonl", None)], demo / "mmc4" / "images"


def small(task: str, **kw):
    extra = {} if task == "mmc4" else {"frames_upbound": 6}
    return CONFIGS[task](image_size=32, samples_per_shard=5, **extra, **kw)


def shard_bytes(task: Path) -> dict[str, bytes]:
    names = sorted(p.name for p in task.glob("*.tar")) + ["index.parquet", "rejects.jsonl", "manifest.json"]
    return {name: (task / name).read_bytes() for name in names}


@pytest.mark.parametrize("task", ["videoqa", "scanqa", "mmc4"])
def test_each_task_writes_readable_shards_index_and_manifest(demo, task, tokenizer_dir, tmp_path):
    inputs, root = demo_inputs(demo, task)
    summary = run_cotrain(task, inputs, root, tmp_path, small(task), tokenizer_dir, progress=False)
    out = tmp_path / task
    manifest = json.loads((out / "manifest.json").read_text())
    info = manifest["splits"]["train"]
    c = info["counts"]
    assert manifest["task"] == task and summary["manifest"]["counts"] == c
    assert c["episodes_in"] == c["episodes_written"] + c["episodes_rejected"] and c["samples_written"] > 5
    assert c["episodes_rejected"] == 0 and len(info["shards"]) > 1
    urls = [str(out / s["shard"]) for s in info["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb"))
    assert len(samples) == c["samples_written"] == pq.read_table(out / "index.parquet").num_rows
    for s in samples:
        meta = s["json"]
        frames = [s[k] for k in sorted(k for k in s if k.endswith(".jpg"))]
        assert meta["task"] == task and len(frames) == meta["n_frames"] >= 1 and meta["n_history"] == 0
        assert all(f.shape == (32, 32, 3) for f in frames)
        assert int((s["input_ids.npy"] == -200).sum()) == meta["n_frames"] and not (s["input_ids.npy"] == -300).any()
    if task == "videoqa":  # youtube.json is sampled random:75%: the manifest records what was selected
        youtube = next(s for s in info["sources"] if s["name"] == "youtube")
        assert youtube["sampling_strategy"] == "random:75%" and youtube["selected"] == -(-youtube["records"] * 3 // 4)
        assert all(len(s["json"]["frame_times"]) == s["json"]["n_frames"] for s in samples)
    # the training loader reads them
    data = load_task(task, [str(out)], "train")
    first = SampleReader().read(data.shard_paths[data.shard[0]], int(data.offset[0]), int(data.size[0]), str(data.keys[0]))
    assert data.task_id == {"videoqa": 1, "scanqa": 2, "mmc4": 3}[task] and len(first["frames"]) == first["meta"]["n_frames"]


def test_videoqa_deterministic_across_runs_workers_and_parts(demo, tokenizer_dir, tmp_path):
    inputs, root = demo_inputs(demo, "videoqa")
    cfg = small("videoqa")
    run_cotrain("videoqa", inputs, root, tmp_path / "a", cfg, tokenizer_dir, progress=False)
    run_cotrain("videoqa", inputs, root, tmp_path / "b", cfg, tokenizer_dir, workers=2, progress=False)
    first = run_cotrain("videoqa", inputs, root, tmp_path / "c", cfg, tokenizer_dir, part=1, num_parts=2, progress=False)
    assert first["manifest"] is None and not (tmp_path / "c" / "videoqa" / "manifest.json").exists()
    run_cotrain("videoqa", inputs, root, tmp_path / "c", cfg, tokenizer_dir, part=0, num_parts=2, progress=False)
    a = shard_bytes(tmp_path / "a" / "videoqa")
    assert a == shard_bytes(tmp_path / "b" / "videoqa") == shard_bytes(tmp_path / "c" / "videoqa")
    # another seed samples other youtube records
    run_cotrain("videoqa", inputs, root, tmp_path / "d", small("videoqa", seed=5), tokenizer_dir, progress=False)
    keys = [set(pq.read_table(tmp_path / x / "videoqa" / "index.parquet").column("key").to_pylist()) for x in "ad"]
    assert keys[0] != keys[1]


def test_mmc4_resume_after_crash_redoes_only_unfinished_shards(demo, tokenizer_dir, tmp_path):
    inputs, root = demo_inputs(demo, "mmc4")
    cfg = small("mmc4")
    run_cotrain("mmc4", inputs, root, tmp_path / "full", cfg, tokenizer_dir, progress=False)
    want = shard_bytes(tmp_path / "full" / "mmc4")
    run_cotrain("mmc4", inputs, root, tmp_path / "crashed", cfg, tokenizer_dir, progress=False)
    out = tmp_path / "crashed" / "mmc4"
    (out / "train-000000.stats.json").unlink()
    (out / "train-000000.tar").rename(out / "train-000000.tar.tmp")
    (out / "train-000001.stats.json").unlink()
    (out / "train-000001.tar").write_bytes(b"stale")
    (out / "manifest.json").unlink()
    summary = run_cotrain("mmc4", inputs, root, tmp_path / "crashed", cfg, tokenizer_dir, progress=False)
    assert summary["shards_written"] == 2 and shard_bytes(out) == want and not list(out.glob("*.tmp"))


@pytest.mark.slow
def test_killed_video_workers_resume_to_identical_output(demo, tokenizer_dir, tmp_path):
    args = [sys.executable, "-m", "pipeline.cli", "videoqa", "--data-config", str(demo / "videoqa" / "data_config.yaml"),
            "--video-root", str(demo / "videoqa" / "videos"), "--tokenizer", str(tokenizer_dir), "--image-size", "32",
            "--samples-per-shard", "1", "--workers", "2", "--quiet"]
    subprocess.run(args + ["--out", str(tmp_path / "full")], check=True, capture_output=True)
    proc = subprocess.Popen(args + ["--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    out = tmp_path / "killed" / "videoqa"
    deadline = time.monotonic() + 60
    while proc.poll() is None and len(list(out.glob("*.stats.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its worker processes at once: no cleanup runs
    proc.wait()
    assert not (out / "manifest.json").exists()
    subprocess.run(args + ["--out", str(tmp_path / "killed")], check=True, capture_output=True)
    assert shard_bytes(out) == shard_bytes(tmp_path / "full" / "videoqa")


# ---------------------------------------------------------------- bad input


def turns(*texts):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


def run_and_rejects(task, inputs, root, cfg, tokenizer_dir, out):
    summary = run_cotrain(task, inputs, root, out, cfg, tokenizer_dir, progress=False)
    rejects = [json.loads(line) for line in (out / task / "rejects.jsonl").read_text().splitlines()]
    c = summary["manifest"]["counts"]
    assert c["episodes_in"] == c["episodes_written"] + c["episodes_rejected"] == c["samples_written"] + len(rejects)
    return {r["episode_id"]: r["reason"] for r in rejects}, summary["manifest"]


def test_each_bad_video_record_is_rejected_with_its_reason(tmp_path, tokenizer_dir):
    videos = tmp_path / "videos" / "src"
    write_mp4(videos / "ok.mp4", 30, 10)
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    good = turns("<image>\nQ?", "A.")
    records = [
        {"id": "ok", "video": "ok.mp4", "conversations": good},
        {"id": "missing", "video": "gone.mp4", "conversations": good},
        {"id": "undecodable", "video": "broken.mp4", "conversations": good},
        {"id": "empty", "video": "ok.mp4", "conversations": []},
        {"id": "order", "video": "ok.mp4", "conversations": [{"from": "gpt", "value": "A."}, {"from": "human", "value": "Q"}]},
        {"id": "unanswered", "video": "ok.mp4", "conversations": turns("<image>\nQ?", "A.", "Q2?")},
        {"id": "long", "video": "ok.mp4", "conversations": turns("<image>\n" + "why " * 300, "A.")},
        {"id": "tokens", "video": "ok.mp4", "conversations": turns("<image>\nQ?", "A.", "<image> again?", "B.")},
        {"id": "novideo", "conversations": good},
        {"id": "escape", "video": "../../outside.mp4", "conversations": good},
    ]
    for r in records:
        r["data_source"] = "src"
    (tmp_path / "qa.json").write_text(json.dumps(records))
    reasons, manifest = run_and_rejects("videoqa", [(tmp_path / "qa.json", None)], tmp_path / "videos",
                                        VideoQAShardConfig(image_size=32, max_tokens=200), tokenizer_dir, tmp_path / "out")
    assert reasons["missing"].startswith("missing video:") and reasons["undecodable"].startswith("undecodable video:")
    assert reasons["empty"] == "empty conversation"
    assert reasons["order"].startswith("turn order not human/gpt alternating")
    assert reasons["unanswered"].startswith("turn order not human/gpt alternating")
    assert reasons["long"].startswith("too many tokens:") and reasons["tokens"].startswith("media tokens:")
    assert reasons["novideo"].startswith("bad annotation:") and "ok" not in reasons
    assert "inside the media root" in reasons["escape"]
    assert manifest["counts"]["samples_written"] == 1
    assert manifest["rejects_by_reason"]["turn order not human/gpt alternating"] == 2


def test_each_bad_scene_record_is_rejected_with_its_reason(tmp_path, tokenizer_dir):
    scenes = tmp_path / "scenes"
    for name in ("ok", "corrupt"):
        (scenes / name).mkdir(parents=True)
        for i in range(12):
            cv2.imwrite(str(scenes / name / f"{i:05d}.jpg"), np.full((20, 20, 3), 20 * i, np.uint8))
    (scenes / "corrupt" / "00010.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (scenes / "nojpeg").mkdir()
    (scenes / "nojpeg" / "00000.txt").write_text("pose")
    q = turns("<video>\nQ?", "A.")
    records = [{"id": "ok", "video": "ok", "conversations": q}, {"id": "gone", "video": "gone", "conversations": q},
               {"id": "corrupt", "video": "corrupt", "conversations": q},
               {"id": "nojpeg", "video": "nojpeg", "conversations": q},
               {"id": "notoken", "video": "ok", "conversations": turns("Q?", "A.")}]
    (tmp_path / "scanqa.json").write_text(json.dumps(records))
    reasons, _ = run_and_rejects("scanqa", [(tmp_path / "scanqa.json", None)], scenes, ScanQAShardConfig(image_size=32),
                                 tokenizer_dir, tmp_path / "out")
    assert reasons["gone"].startswith("missing scene folder:") and reasons["nojpeg"].startswith("missing scene frames:")
    assert reasons["corrupt"].startswith("corrupt frame:") and "00010.jpg" in reasons["corrupt"]
    assert reasons["notoken"].startswith("media tokens:") and "ok" not in reasons


def test_each_bad_document_is_rejected_with_its_reason(tmp_path, tokenizer_dir):
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "ok.jpg"), np.full((20, 20, 3), 99, np.uint8))
    (images / "bad.jpg").write_bytes(b"not an image")

    def doc(doc_id, names, text=("A sentence.", "Another one.")):
        return json.dumps({"doc_id": doc_id, "text_list": list(text),
                           "image_info": [{"image_name": n, "matched_text_index": 1} for n in names]})

    lines = [doc("ok", ["ok.jpg"]), doc("missing", ["ok.jpg", "gone.jpg"]), doc("corrupt", ["bad.jpg"]),
             doc("noimages", []), doc("notext", ["ok.jpg"], text=("", " ")), "{not json",
             json.dumps({"doc_id": "index", "text_list": ["x"], "image_info": [{"image_name": "ok.jpg",
                                                                               "matched_text_index": 4}]})]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    reasons, manifest = run_and_rejects("mmc4", [(tmp_path / "docs.jsonl", None)], images,
                                        MMC4ShardConfig(image_size=32), tokenizer_dir, tmp_path / "out")
    assert reasons["missing"].startswith("missing image:") and reasons["corrupt"].startswith("corrupt image:")
    assert reasons["noimages"].startswith("empty conversation") and reasons["notext"].startswith("empty conversation")
    assert reasons["index"].startswith("bad annotation:") and reasons[""].startswith("bad annotation: not valid JSON")
    assert manifest["counts"]["episodes_in"] == 7 and manifest["counts"]["samples_written"] == 1


def test_cli_videoqa_with_a_data_config_and_clear_errors(demo, tokenizer_dir, tmp_path):
    args = ["videoqa", "--data-config", str(demo / "videoqa" / "data_config.yaml"), "--video-root",
            str(demo / "videoqa" / "videos"), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path),
            "--config", "configs/shards/videoqa.yaml", "--image-size", "32", "--frames-upbound", "4", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "records:" in result.output and "academic:" in result.output
    manifest = json.loads((tmp_path / "videoqa" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["options"]["frames_upbound"] == 4  # the resolved config is saved
    both = CliRunner().invoke(main, args + ["--json", str(demo / "videoqa" / "val.json")])
    assert both.exit_code != 0 and "not both" in both.output
    bad = CliRunner().invoke(main, ["mmc4", "--jsonl", str(demo / "mmc4" / "docs.jsonl"), "--image-root",
                                    str(demo / "mmc4" / "images"), "--tokenizer", str(tokenizer_dir), "--out",
                                    str(tmp_path), "--frames-upbound", "3"])
    assert bad.exit_code != 0 and "no such option" in bad.output.lower()


def test_input_files_must_have_distinct_names(tmp_path, tokenizer_dir):
    from pipeline.reader import AnnotationError

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "qa.json").write_text("[]")
    with pytest.raises(AnnotationError, match="input file names must be distinct"):
        run_cotrain("videoqa", [(tmp_path / "a" / "qa.json", None), (tmp_path / "b" / "qa.json", None)], tmp_path,
                    tmp_path / "out", VideoQAShardConfig(), tokenizer_dir, progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_cli_reports_subset_keywords_that_match_nothing(demo, tokenizer_dir, tmp_path):
    (tmp_path / "mix.yaml").write_text(f"datasets:\n  - json_path: {demo / 'videoqa' / 'academic.json'}\n"
                                       "    sampling_strategy: first:3\n    sampling_subset: CLIP_000,perceptiontest\n")
    args = ["videoqa", "--data-config", str(tmp_path / "mix.yaml"), "--video-root", str(demo / "videoqa" / "videos"),
            "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "out"), "--image-size", "32",
            "--frames-upbound", "2", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "records: 3 in" in result.output  # first:3, then the keyword matched case-insensitively
    assert "sampling_subset keyword(s) perceptiontest match no video path" in result.output
    sources = json.loads((tmp_path / "out" / "videoqa" / "manifest.json").read_text())["splits"]["train"]["sources"]
    assert sources[0]["subset_unmatched"] == ["perceptiontest"] and sources[0]["selected"] == 3


def test_cli_departure_options_reach_the_samples(demo, tokenizer_dir, tmp_path):
    base = ["mmc4", "--jsonl", str(demo / "mmc4" / "val.jsonl"), "--image-root", str(demo / "mmc4" / "images"),
            "--tokenizer", str(tokenizer_dir), "--image-size", "32", "--quiet"]
    glued = CliRunner().invoke(main, base + ["--out", str(tmp_path / "a")])
    spaced = CliRunner().invoke(main, base + ["--out", str(tmp_path / "b"), "--sentence-join", " ",
                                              "--image-choice", "sentence_order"])
    assert glued.exit_code == 0 and spaced.exit_code == 0, glued.output + spaced.output
    options = json.loads((tmp_path / "b" / "mmc4" / "manifest.json").read_text())["splits"]["train"]["options"]
    assert options["sentence_join"] == " " and options["image_choice"] == "sentence_order"
    assert json.loads((tmp_path / "a" / "mmc4" / "manifest.json").read_text())["splits"]["train"]["options"][
        "sentence_join"] == ""
    # the same folder under other options is refused on resume, naming them
    again = CliRunner().invoke(main, base + ["--out", str(tmp_path / "a"), "--sentence-join", " "])
    assert again.exit_code != 0 and "options" in again.output
