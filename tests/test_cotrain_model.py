"""Stage 2: all four tasks in one mix, a mixed batch through the model (no memory, variable frames), per-task eval."""

import pytest
import torch

from conftest import episode, write_source
from pipeline.config import MMC4ShardConfig, NavShardConfig, ScanQAShardConfig, VideoQAShardConfig
from pipeline.cotrain import run_cotrain
from pipeline.nav import run_nav
from pipeline.synth_cotrain import write_cotrain_demo
from pipeline.tokens import IMAGE_PLACEHOLDER, MEMORY_PLACEHOLDER
from streamvln.data import build_loader
from streamvln.data.config import MixConfig, TaskMix
from streamvln.evaluate import answer_word_ids, evaluate, format_report
from streamvln.model import StreamVLNConfig, StreamVLNForCausalLM
from test_train import TINY

TOKENS_PER_FRAME = 4  # 56-pixel frames, 14-pixel patches: 4x4, pooled to 2x2


@pytest.fixture(scope="module")
def stage2_shards(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("stage2")
    src = write_source(root / "data", "R2R", [episode(i, 40 + 9 * i, ("Go to the sofa.",)) for i in range(3)])
    run_nav([src], root / "shards", NavShardConfig(image_size=56), tokenizer_dir, progress=False)
    write_cotrain_demo(root / "data", count=6, val_count=2, seed=1)
    d = root / "data"
    run_cotrain("videoqa", [(d / "videoqa" / "academic.json", None), (d / "videoqa" / "youtube.json", None)],
                d / "videoqa" / "videos", root / "shards", VideoQAShardConfig(image_size=56, frames_upbound=6),
                tokenizer_dir, progress=False)
    run_cotrain("scanqa", [(d / "scanqa" / "scanqa.json", None)], d / "scanqa" / "scenes", root / "shards",
                ScanQAShardConfig(image_size=56, frames_upbound=3), tokenizer_dir, progress=False)
    run_cotrain("mmc4", [(d / "mmc4" / "docs.jsonl", None)], d / "mmc4" / "images", root / "shards",
                MMC4ShardConfig(image_size=56), tokenizer_dir, progress=False)
    return root / "shards"


def mix(shards, **kw) -> MixConfig:
    tasks = [TaskMix(name, [str(shards / name)], weight=1.0) for name in ("nav", "videoqa", "scanqa", "mmc4")]
    return MixConfig(tasks=tasks, image_size=56, batch_size=4, mix="sample", uint8_images=True, **kw)


def test_a_mixed_batch_trains_every_task(stage2_shards):
    batch = next(iter(build_loader(mix(stage2_shards), num_workers=0)))
    assert sorted(batch["task_ids"].tolist()) == [0, 1, 2, 3]  # one sample of each task
    n_images, n_history = batch["n_images"].tolist(), batch["n_history"].tolist()
    assert len(set(n_images)) > 1  # variable frame counts, zero-padded to the longest
    ids = batch["input_ids"]
    for i, task in enumerate(batch["task_ids"].tolist()):
        memory = int((ids[i] == MEMORY_PLACEHOLDER).sum())
        assert memory == (1 if n_history[i] else 0) and (task == 0 or memory == 0)
        assert int((ids[i] == IMAGE_PLACEHOLDER).sum()) == n_images[i] - n_history[i]
        assert not batch["images"][i, n_images[i]:].any()

    torch.manual_seed(0)
    model = StreamVLNForCausalLM(StreamVLNConfig(**TINY))
    embeds, labels, mask = model.embed_multimodal(batch["input_ids"], batch["labels"], batch["attention_mask"],
                                                  batch["images"], batch["n_images"], batch["n_history"])
    for i in range(len(n_images)):  # each placeholder became its frames' tokens: text + frames x tokens
        text = int(batch["attention_mask"][i].sum()) - int((ids[i] < 0).sum())
        assert int(mask[i].sum()) == text + n_images[i] * TOKENS_PER_FRAME
    out = model(**batch)
    assert torch.isfinite(out["loss"]) and (out["sample_tokens"] > 0).all()  # every task contributes to the loss
    out["loss"].backward()
    vision = model.model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight
    assert vision.grad is not None and vision.grad.abs().sum() > 0


def test_evaluation_reports_every_task(stage2_shards, tokenizer_dir):
    torch.manual_seed(0)
    model = StreamVLNForCausalLM(StreamVLNConfig(**TINY))
    names = ["nav", "videoqa", "scanqa", "mmc4"]
    colours = answer_word_ids(tokenizer_dir, ["red", "green", "blue", "yellow", "white", "black"])
    assert len(colours) == 12  # each colour alone and after a space
    result = evaluate(model, build_loader(mix(stage2_shards, finite=True), num_workers=0), names, max_batches=3,
                      word_ids=colours)
    assert set(result["per_task"]) == set(names)
    for name, v in result["per_task"].items():
        assert v["samples"] == 3 and v["tokens"] > 0 and 0 <= v["token_accuracy"] <= 1 and v["loss"] > 0
        assert ("accuracy" in v) == (name == "nav")  # next-action accuracy only where there are actions
        assert ("word_accuracy" in v) == (name != "nav") and v.get("words", 3) >= 3  # every answer names a colour
    report = format_report(result)
    assert all(f"task {name}" in report for name in names) and "next-action accuracy" in report
