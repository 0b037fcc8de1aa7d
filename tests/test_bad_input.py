"""Every kind of bad input ends as a reject with its reason (or a clear error), and the counts add up."""

import json

import pytest
from click.testing import CliRunner

from conftest import episode, write_source
from pipeline.cli import main
from pipeline.config import NavShardConfig
from pipeline.nav import run_nav
from pipeline.reader import AnnotationError, read_source


def run(tmp_path, sources, tokenizer_dir, **options):
    cfg = NavShardConfig(image_size=32, samples_per_shard=4, **options)
    summary = run_nav(sources, tmp_path / "out", cfg, tokenizer_dir, progress=False)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "nav" / "rejects.jsonl").read_text().splitlines()]
    counts = summary["manifest"]["counts"]
    assert counts["episodes_in"] == counts["episodes_written"] + counts["episodes_rejected"]
    return summary["manifest"], rejects


def test_each_bad_episode_is_rejected_with_its_reason(tmp_path, tokenizer_dir):
    good = episode("good", 10)
    entries = [
        good,
        {**episode("nodir", 10), "video": "images/absent"},
        episode("fewframes", 10),
        episode("corrupt", 10),
        episode("truncated", 10),
        {**episode("badaction", 10), "actions": [-1, 1, 7, 1, 1]},
        {**episode("stringaction", 10), "actions": [-1, 1, "1", 1]},
        {**episode("empty", 10), "instructions": ["Go on.", "   "]},
        {**episode("nonstring", 10), "instructions": ["Go on.", 42]},
        {**episode("noinstr", 10), "instructions": []},
        episode("short", 3),
        {"id": "nokeys", "video": "images/x"},
        ["not", "an", "object"],
        {**episode("good", 10), "video": "images/dup"},
        {**episode("escape", 10), "video": "../../etc"},
        {**episode("fewdescriptions", 10), "descriptions": ["nothing."] * 9},
        {**episode("blankdescription", 10), "descriptions": ["nothing."] * 9 + [" "]},
    ]
    src = write_source(tmp_path / "data", "R2R", entries, frames={"nodir": None, "fewframes": 6, "escape": None})
    (src / "images/ep_corrupt/rgb/005.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    jpeg = (src / "images/ep_truncated/rgb/001.jpg").read_bytes()
    (src / "images/ep_truncated/rgb/001.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    manifest, rejects = run(tmp_path, [src], tokenizer_dir)
    reasons = {r["episode_id"] or r["input"]: r["reason"] for r in rejects}
    assert manifest["counts"]["episodes_in"] == len(entries)
    assert manifest["counts"]["episodes_written"] == 1
    assert manifest["counts"]["episodes_rejected"] == len(entries) - 1 == len(rejects)
    assert reasons["nodir"].startswith("missing frame folder")
    assert reasons["fewframes"] == (f"fewer frames than actions: 6 frames in {src}/images/ep_fewframes/rgb "
                                    "for 10 actions")
    assert reasons["corrupt"].startswith("corrupt frame: cannot decode frame") and "005.jpg" in reasons["corrupt"]
    assert reasons["truncated"].startswith("corrupt frame") and "001.jpg" in reasons["truncated"]
    assert reasons["badaction"].startswith("unknown action id(s) [7]")
    assert reasons["stringaction"] == "actions must be a list of integers"
    assert reasons["empty"] == "instruction 1 is empty"
    assert reasons["nonstring"] == "instruction 1 is int, not a string"
    assert reasons["noinstr"].startswith("instructions must be")
    assert reasons["short"] == "too short: 3 actions, need at least 4"
    assert reasons["nokeys"] == "missing key(s): instructions, actions"
    assert reasons["R2R/annotations.json[12]"] == "entry is list, not an object"
    assert reasons["good"] == "duplicate episode id in this source"
    assert reasons["escape"].startswith("video must be a relative path inside the source")
    assert reasons["fewdescriptions"] == reasons["blankdescription"] == \
        "descriptions must be a list of 10 non-empty strings, one per frame"
    assert manifest["rejects_by_reason"]["corrupt frame"] == 2
    assert all(r["input"].startswith("R2R/annotations.json[") for r in rejects)


def test_too_many_tokens_rejects_samples_and_keeps_the_rest(tmp_path, tokenizer_dir):
    long_instruction = "Walk along the corridor past many doors " * 40 + "and stop."
    src = write_source(tmp_path / "data", "R2R", [episode(1, 40, ("Go.", long_instruction)), episode(2, 8, (long_instruction,))])
    manifest, rejects = run(tmp_path, [src], tokenizer_dir, max_tokens=300)
    c = manifest["counts"]
    assert c["samples_written"] == 2  # episode 1, instruction 0: chunks 0 and 32
    assert c["samples_rejected"] == 3  # episode 1 instruction 1 (two chunks) + episode 2
    assert c["episodes_written"] == 1 and c["episodes_rejected"] == 1
    assert all(r["level"] == "sample" and r["reason"].startswith("too many tokens") for r in rejects)
    assert "sample=R2R-1-i1-s0032" in " ".join(r["input"] for r in rejects)


@pytest.mark.parametrize("text,message", [
    ('[{"id": 1, "video": "a",\n "actions": [1, 2,, 3]}]', "invalid JSON at line 2, column 19"),
    ('{"episodes": []}', "top level must be a JSON list, got dict"),
    ("", "invalid JSON at line 1, column 1"),
])
def test_malformed_annotations_are_a_clear_error_before_any_work(tmp_path, tokenizer_dir, text, message):
    src = tmp_path / "R2R"
    src.mkdir()
    (src / "annotations.json").write_text(text)
    with pytest.raises(AnnotationError, match=message):
        read_source(src)
    result = CliRunner().invoke(main, ["nav", "--src", str(src), "--tokenizer", str(tokenizer_dir),
                                       "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1 and str(src / "annotations.json") in result.output and message in result.output
    assert not (tmp_path / "out").exists()


def test_missing_annotations_and_duplicate_source_names(tmp_path, tokenizer_dir):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["nav", "--src", str(tmp_path / "empty"), "--tokenizer", str(tokenizer_dir),
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "annotations.json: not found" in result.output
    a = write_source(tmp_path / "a", "R2R", [episode(1, 8)])
    b = write_source(tmp_path / "b", "R2R", [episode(1, 8)])
    result = CliRunner().invoke(main, ["nav", "--src", str(a), "--src", str(b), "--tokenizer", str(tokenizer_dir),
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "source folder names must be distinct" in result.output


def test_bad_config_is_refused(tmp_path, tokenizer_dir):
    src = write_source(tmp_path / "data", "R2R", [episode(1, 8)])
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("num_frames: 32\nnum_frame: 16\n")
    result = CliRunner().invoke(main, ["nav", "--src", str(src), "--tokenizer", str(tokenizer_dir), "--config", str(cfg)])
    assert result.exit_code == 1 and "unknown key(s) num_frame" in result.output
    result = CliRunner().invoke(main, ["nav", "--src", str(src), "--tokenizer", str(tmp_path), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "not a tokenizer directory" in result.output
