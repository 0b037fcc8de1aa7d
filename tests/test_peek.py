"""tools/peek: summary, one sample's dialogue and contact sheet, and --verify catching damage."""

import subprocess

import pytest
from PIL import Image

from pipeline.nav import run_nav
from pipeline.peek import summary, verify

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.fixture
def task(tiny_sources, small_cfg, tokenizer_dir, tmp_path):
    (tiny_sources[0] / "images/ep_2/rgb/001.jpg").write_bytes(b"broken")  # one reject to report
    run_nav(tiny_sources, tmp_path / "shards", small_cfg, tokenizer_dir, progress=False)
    return tmp_path / "shards" / "nav"


def peek(*args):
    return subprocess.run([str(ROOT / "tools" / "peek"), *map(str, args)], capture_output=True, text=True)


def test_summary_reports_counts_sources_histograms_and_rejects(task):
    text = summary(task)
    assert "episodes: 7 in = 6 written + 1 rejected" in text
    assert "R2R " in text and "RxR " in text
    for title in ("text tokens per sample", "frames per sample", "labelled tokens per sample"):
        assert title in text
    assert "1  corrupt frame" in text
    result = peek(task)
    assert result.returncode == 0 and result.stdout.strip() == text


def test_sample_shows_dialogue_with_labelled_spans_and_a_contact_sheet(task, tokenizer_dir, tmp_path):
    sheet = tmp_path / "sheet.png"
    result = peek(task, "--sample", "R2R-3-i0-s0064", "--tokenizer", tokenizer_dir, "--sheet", sheet, "--no-color")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "These are your historical observations: <memory>." in out
    assert "Your task is to Turn left at the sofa. Devise" in out
    assert "<|im_end|>\n<|im_start|>]]user" in out and "<|im_start|>assistant\n" in out
    assert out.count("<image>") == 1  # 65 actions: the last chunk holds one action, one turn
    assert "<|im_start|>assistant\nSTOP<|im_end|>\n]]" in out
    with Image.open(sheet) as im:
        assert im.width == 8 * 192 and im.height == 2 * (192 + 16)  # 8 history + 1 current frame
    result = peek(task, "--sample", "R2R-3-i0-s0064", "--tokenizer", tokenizer_dir, "--sheet", sheet, "--color")
    assert "\x1b[" in result.stdout and "[[" not in result.stdout
    missing = peek(task, "--sample", "nope", "--tokenizer", tokenizer_dir)
    assert missing.returncode == 1 and "no sample 'nope'" in missing.stderr


def test_verify_passes_then_catches_a_flipped_byte_and_a_bad_member(task):
    assert verify(task) == []
    assert peek(task, "--verify").returncode == 0
    shard = task / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify(task)
    assert any("sha256 differs" in p for p in problems)
    result = peek(task, "--verify")
    assert result.returncode == 1 and "problem(s)" in result.stderr
    shard.unlink()
    assert any("missing" in p for p in verify(task))


def test_verify_checks_frame_references_and_refuses_an_old_schema(task):
    import json
    import tarfile

    assert "frames: " in summary(task) and "JPEGs stored for" in summary(task)
    shard = sorted(task.glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        info = next(m for m in tar if m.name.endswith(".json"))
        old = tar.extractfile(info).read()
    meta = json.loads(old)
    # point a sample's first frame 512 bytes early (into a tar header), same json length
    meta["frame_ranges"][0][0] -= 512
    new = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    assert len(new) <= len(old)
    with open(shard, "r+b") as f:
        f.seek(info.offset_data)
        f.write(new + b" " * (len(old) - len(new)))
    problems = verify(task)
    assert any("references bytes" in p and "no JPEG member" in p for p in problems)
    manifest = json.loads((task / "manifest.json").read_text())
    (task / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 1}))
    assert verify(task) == [f"{task}: schema version 1 cannot be read (this version reads 2, 3): write the shards again"]


@pytest.fixture(scope="module")
def cotrain_tasks(tmp_path_factory, tokenizer_dir):
    from pipeline.config import MMC4ShardConfig, VideoQAShardConfig
    from pipeline.cotrain import run_cotrain
    from pipeline.synth_cotrain import write_cotrain_demo

    root = tmp_path_factory.mktemp("peek")
    write_cotrain_demo(root / "data", count=4, val_count=2, seed=2)
    d = root / "data"
    run_cotrain("videoqa", [(d / "videoqa" / "academic.json", None)], d / "videoqa" / "videos", root / "shards",
                VideoQAShardConfig(image_size=32, frames_upbound=4, add_time_instruction=True), tokenizer_dir,
                progress=False)
    run_cotrain("mmc4", [(d / "mmc4" / "docs.jsonl", None)], d / "mmc4" / "images", root / "shards",
                MMC4ShardConfig(image_size=32), tokenizer_dir, progress=False)
    return root / "shards"


def test_peek_shows_video_qa_turns_and_frame_times(cotrain_tasks, tokenizer_dir, tmp_path):
    task = cotrain_tasks / "videoqa"
    assert "records: 2 in = 2 written + 0 rejected" in summary(task)
    sheet = tmp_path / "v.png"
    result = peek(task, "--sample", "academic-0000000-academic_0000", "--tokenizer", tokenizer_dir, "--no-color",
                  "--sheet", sheet)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "--- 2 exchanges ---" in out and "human '<image>x4\\nThe video lasts for" in out
    assert "gpt   'The ball is " in out
    times = [line for line in out.splitlines() if line.startswith("  f00")]
    assert len(times) == 4 and times[0] == "  f000  frame 0 @ 0.00s" and " @ " in times[-1]
    with Image.open(sheet) as im:
        assert im.width == 8 * 192 and im.height == 192 + 16


def test_peek_shows_mmc4_exchanges_and_images(cotrain_tasks, tokenizer_dir):
    task = cotrain_tasks / "mmc4"
    result = peek(task, "--sample", "docs-0000000-https___example_com_docs_0", "--tokenizer", tokenizer_dir,
                  "--no-color", "--sheet", task.parent / "m.png")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "exchanges ---" in out and "gpt   'This photo shows a " in out and "<IMAGE>" in out
    assert "  f000  docs_0000_0.jpg" in out
    assert peek(task, "--verify").returncode == 0
