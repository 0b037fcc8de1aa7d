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
