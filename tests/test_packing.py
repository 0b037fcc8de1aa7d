"""Sample packing: the same loss and gradients as the unpacked batch, attention kept within samples, resume intact."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from conftest import episode, write_source
from pipeline.config import ConfigError, NavShardConfig
from pipeline.nav import run_nav
from streamvln.data import build_loader
from streamvln.data.config import MixConfig, TaskMix
from streamvln.model.build import build_model
from streamvln.model.packing import pack, plan_rows
from test_train import TINY, losses, run


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("packing")
    src = write_source(root / "data", "A", [episode(i, 14 + 9 * i, ("Go to the sofa.", "Walk left past the table."))
                                             for i in range(5)])
    run_nav([src], root / "shards", NavShardConfig(image_size=56, samples_per_shard=8), tokenizer_dir, progress=False)
    (root / "model.yaml").write_text(yaml.safe_dump(TINY))
    return root


def model_and_batch(root, **mix):
    torch.manual_seed(0)
    model = build_model(str(root / "model.yaml"), None)
    cfg = MixConfig(tasks=[TaskMix(name="nav", shards=[str(root / "shards" / "nav")])], image_size=56, batch_size=6,
                    uint8_images=True, **mix)
    return model, next(iter(build_loader(cfg)))


def loss_and_grads(model, batch, **kw):
    model.zero_grad()
    out = model(**batch, **kw)
    out["loss_sum"].backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_rows_are_filled_in_order_and_a_long_sample_is_never_cut():
    assert plan_rows([3, 4, 2, 6, 1], 7) == [[0, 1], [2], [3, 4]]
    assert plan_rows([9, 2, 2], 5) == [[0], [1, 2]]  # 9 > 5: a row of its own, as long as it is
    embeds = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    labels = torch.tensor([[5, 6, 7, -100], [8, 9, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    p = pack(embeds, labels, mask, 8)
    assert p.embeds[:, :, 0].tolist() == [[0, 1, 2, 4, 5]] and p.tokens == 5
    assert p.labels.tolist() == [[-100, 6, 7, -100, 9]]  # a sample's first label is never the previous one's target
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1]] and p.sample.tolist() == [[0, 0, 0, 1, 1]]


def test_packed_loss_and_gradients_equal_the_unpacked_batch(shards):
    model, batch = model_and_batch(shards)
    assert int(batch["n_history"].max()) > 0 and len(set(batch["attention_mask"].sum(1).tolist())) > 1
    plain, g_plain = loss_and_grads(model, batch)
    lengths = sorted(plain["sample_tokens"].tolist())
    budget = int(plain["lm_positions"] / len(batch["keys"]) * 2)  # about two samples a row
    packed, g_packed = loss_and_grads(model, batch, pack_tokens=budget)
    assert packed["lm_tokens"] == plain["lm_tokens"] and packed["lm_positions"] < plain["lm_positions"], lengths
    assert plain["lm_rows"] == len(batch["keys"]) and 1 < packed["lm_rows"] < plain["lm_rows"]
    torch.testing.assert_close(packed["loss_sum"], plain["loss_sum"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed["sample_loss_sum"], plain["sample_loss_sum"], rtol=1e-5, atol=1e-5)
    assert packed["sample_tokens"].tolist() == plain["sample_tokens"].tolist()
    assert packed["targets"].tolist() == plain["targets"].tolist()  # labelled tokens keep their order
    assert packed["sample_of_token"].tolist() == plain["sample_of_token"].tolist()
    assert packed["predictions"].tolist() == plain["predictions"].tolist()
    assert g_packed.keys() == g_plain.keys()
    for name in g_plain:
        torch.testing.assert_close(g_packed[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_without_restarted_positions_attention_would_cross_samples(shards):
    """The control: the same packed rows with positions running on (no restart) give another loss, so the
    equality above is the block-diagonal mask's doing."""
    model, batch = model_and_batch(shards)
    with torch.no_grad():
        embeds, labels, mask = model.embed_multimodal(batch["input_ids"], batch["labels"], batch["attention_mask"],
                                                      batch["images"], batch["n_images"], batch["n_history"])
        p = pack(embeds, labels, mask, int(mask.sum(1).max()) * 2)
        assert len(p.embeds) < len(embeds)

        def nll(position_ids):
            hidden = model.model(inputs_embeds=p.embeds, position_ids=position_ids, use_cache=False).last_hidden_state
            logits = model.lm_head(hidden[:, :-1]).float()
            return torch.nn.functional.cross_entropy(logits.transpose(1, 2), p.labels[:, 1:], ignore_index=-100,
                                                     reduction="sum")

        running = torch.arange(p.embeds.shape[1])[None].expand_as(p.position_ids)
        plain = model(**batch)["loss_sum"]
        torch.testing.assert_close(nll(p.position_ids), plain, rtol=1e-5, atol=1e-5)
        assert abs(float(nll(running)) - float(plain)) > 1e-3


def test_the_option_is_checked_and_reaches_the_model(shards):
    with pytest.raises(ConfigError, match="pack_tokens must be >= 0"):
        MixConfig(tasks=[TaskMix(name="nav", shards=["x"])], pack_tokens=-1).validate()
    _, batch = model_and_batch(shards, pack_tokens=512)
    assert batch["pack_tokens"] == 512
    _, batch = model_and_batch(shards)
    assert "pack_tokens" not in batch
    from streamvln.config import TrainConfig
    with pytest.raises(ConfigError, match="needs the flash-attn package"):  # not installed on CPU machines
        TrainConfig(model_config="m.yaml", attn_implementation="flash_attention_2").validate()
    with pytest.raises(ConfigError, match="attn_implementation must be one of"):
        TrainConfig(model_config="m.yaml", attn_implementation="flash").validate()
    torch.manual_seed(0)
    eager = build_model(str(shards / "model.yaml"), None, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    from test_manip import TINY_VLA, build_model_from
    vla = build_model_from(TINY_VLA)
    with pytest.raises(ValueError, match="not packed"):
        vla(input_ids=None, attention_mask=None, images=None, actions=None, action_mask=None, pack_tokens=64)
    with pytest.raises(ValueError, match="full_logits: the VLA model has an action head"):
        vla(input_ids=None, attention_mask=None, images=None, actions=None, action_mask=None, full_logits=True)


def packed_run(shards, tmp_path, mix: dict, train: dict) -> list[str]:
    """A packed mix (pack_tokens 400) and a 4-step train config written under tmp_path; streamvln.train's args."""
    mix = {"tasks": [{"name": "nav", "shards": [str(shards / "shards" / "nav")]}], "image_size": 56,
           "uint8_images": True, "pack_tokens": 400, **mix}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mix))
    train = {"model_config": str(shards / "model.yaml"), "max_steps": 4, "lr": 1e-3, "vision_lr": 1e-3,
             "warmup_ratio": 0.0, "bf16": False, "log_every": 1, "save_every": 2, "keep_checkpoints": 2, **train}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    return ["-m", "streamvln.train", "--shards", str(tmp_path / "mix.yaml"), "--config", str(tmp_path / "train.yaml")]


def resume_at_step_2(args: list[str], source, target, reference: dict, *extra: str, rel: float = 1e-5) -> None:
    """Resume from `source`'s step-2 checkpoint in `target`: steps 3 and 4 give `reference`'s losses."""
    (target / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / "step-00000002", target / "checkpoints" / "step-00000002")
    run(*args, *extra, "--output-dir", str(target), "--resume")
    again, _ = losses(target)
    assert sorted(again) == [3, 4]
    for step in (3, 4):
        assert again[step] == pytest.approx(reference[step], rel=rel, abs=1e-6), step


@pytest.mark.slow
def test_a_packed_training_run_resumes_exactly(shards, tmp_path):
    args = packed_run(shards, tmp_path, {"batch_size": 3, "augment": True},
                      {"grad_accum": 2, "gradient_checkpointing": True, "num_workers": 1})
    run(*args, "--output-dir", str(tmp_path / "full"))
    full, _ = losses(tmp_path / "full")
    assert json.loads((tmp_path / "full" / "run_config.json").read_text())["mix"]["pack_tokens"] == 400
    resume_at_step_2(args, tmp_path / "full", tmp_path / "resumed", full)


@pytest.mark.slow
def test_packed_runs_on_two_ranks_and_on_one_give_the_same_losses_and_resume_across(shards, tmp_path):
    """Elastic resume with packing: 2 ranks x batch 2 and 1 rank x batch 4 are the same global batch, so the
    same losses (packing changes rows, not the global-token normalisation); the 2-rank run's checkpoint
    resumes on 1 rank to the same next losses."""
    import subprocess
    import sys
    from pathlib import Path

    from test_train import ENV, ROOT
    args = packed_run(shards, tmp_path, {"batch_size": 2},
                      {"grad_accum": 1, "gradient_checkpointing": False, "num_workers": 0})
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", "29655"]
    r = subprocess.run([*torchrun, *args, "--output-dir", str(tmp_path / "two")], capture_output=True, text=True,
                       env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    run(*args, "--batch-size", "4", "--output-dir", str(tmp_path / "one"))
    two, _ = losses(tmp_path / "two")
    one, _ = losses(tmp_path / "one")
    for step in (1, 2, 3, 4):
        assert one[step] == pytest.approx(two[step], rel=1e-4, abs=1e-6), step
    resume_at_step_2(args, tmp_path / "two", tmp_path / "two_to_one", two, "--batch-size", "4", rel=1e-4)
