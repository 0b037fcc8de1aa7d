"""bf16 on CPU against fp32: a training run (DeepSpeed's bf16), the agent's decisions, RL log-probabilities, the VLA."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.qwen_tokenizer import load_tokenizer
from streamvln.agent.streaming import AgentConfig, StreamingAgent
from streamvln.model.config import StreamVLNConfig
from streamvln.model.modeling import StreamVLNForCausalLM
from test_manip import manip_shards  # noqa: F401 (a fixture: tiny CALVIN shards)

ROOT = Path(__file__).resolve().parent.parent
MOVES = [76286, 71858, 51018, 50669, 151645]  # ↑ ← → STOP <|im_end|>
UP = 76286
# bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%); a few layers of rounding give a few % on a logit
# (measured 2.4% on torch 2.13, 5.2% on 2.11); a broken path (a mask, a splice, a cast) is off by ~100%
LOGIT_TOL = 0.1  # of the largest logit's magnitude


def tiny(vocab) -> StreamVLNForCausalLM:
    torch.manual_seed(0)
    cfg = yaml.safe_load((ROOT / "configs/model/tiny.yaml").read_text())
    cfg["initializer_range"] = 0.1  # logits of order 1, so a relative tolerance means something
    model = StreamVLNForCausalLM(StreamVLNConfig(**cfg)).eval()
    model.set_output_vocab(vocab)
    return model


def agents(model, tok, **cfg):
    """The same weights as an fp32 and a bf16 agent."""
    base = dict(num_frames=8, num_history=4, image_size=112, max_new_tokens=5, **cfg)
    fp32 = StreamingAgent(model, tok, AgentConfig(**base))
    bf16 = StreamingAgent(copy.deepcopy(model).to(torch.bfloat16), tok, AgentConfig(**base))
    assert next(bf16.net.parameters()).dtype == torch.bfloat16
    return fp32, bf16


def frames(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (36, 48, 3), dtype=np.uint8) for _ in range(n)]


def close(a: torch.Tensor, b: torch.Tensor, ids) -> float:
    """Largest difference over the restricted vocabulary, relative to the fp32 logits' scale."""
    a, b = a[ids].float(), b[ids].float()
    return float((a - b).abs().max() / a.abs().max())


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def test_agent_decision_logits_in_bf16_match_fp32(tok):
    """First decisions of 6 episodes (prompt, vision tower, projector, pooling, prefill), then a run whose
    answers cannot differ (a head that only knows ↑), so every later decision, the KV-cached turns and the
    windows reopened with memory frames, is compared on the same context."""
    fp32, bf16 = agents(tiny(MOVES), tok)
    worst = 0.0
    for k, stream in enumerate(frames(s, 1) for s in range(6)):
        for agent in (fp32, bf16):
            agent.reset(0, f"ep{k}", ["Walk to the red ball and stop next to it.", "Turn left at the sofa."][k % 2])
            agent.act(stream)
        worst = max(worst, close(fp32.envs[0].last_logits, bf16.envs[0].last_logits, MOVES))
    assert worst < LOGIT_TOL, worst

    fp32, bf16 = agents(tiny([UP]), tok)
    for agent in (fp32, bf16):
        agent.reset(0, "ep", "Walk to the red ball and stop next to it.")
    seen = []
    for f in frames(7, 24):
        decided = [agent.envs[0].turns for agent in (fp32, bf16)]
        a, b = fp32.act([f]), bf16.act([f])
        assert a == b
        if fp32.envs[0].turns != decided[0]:
            assert bf16.envs[0].turns != decided[1]
            seen.append((fp32.envs[0].last_logits[UP].item(), bf16.envs[0].last_logits[UP].item(),
                         any(p[0] == "turn" and p[3] > 0 for p in fp32.envs[0].last_context)))
    assert len(seen) >= 4 and any(memory for *_, memory in seen)  # decisions in windows opened with memory
    scale = max(abs(a) for a, _, _ in seen)
    assert all(abs(a - b) < LOGIT_TOL * scale for a, b, _ in seen), seen


def test_rl_logprob_recomputation_in_bf16_matches_fp32(tok):
    """Decisions the fp32 agent made (their exact contexts, memory windows included), recomputed by
    sequence_logprobs under the fp32 and the bf16 weights."""
    from streamvln.rl.logprob import sequence_logprobs

    fp32, bf16 = agents(tiny(MOVES), tok)
    fp32.reset(0, "ep", "Walk to the red ball and stop next to it.")
    items = []
    for f in frames(3, 24):
        before = fp32.envs[0].turns
        fp32.act([f])
        env = fp32.envs[0]
        if env.turns != before:
            items.append((list(env.frames), list(env.last_context), list(env.last_tokens)))
    assert len(items) >= 3 and any(p[0] == "turn" and p[3] > 0 for _, ctx, _ in items for p in ctx)
    with torch.no_grad():
        a, ent_a, _ = sequence_logprobs(fp32, items, 1.0)
        b, ent_b, _ = sequence_logprobs(bf16, items, 1.0)
    assert a.dtype == b.dtype == torch.float32  # the softmax is taken in fp32 whatever the weights
    n = torch.tensor([len(t) for *_, t in items], dtype=torch.float32)
    # per token: |log p_bf16 - log p_fp32| under 0.03 nats (a probability off by ~3%)
    assert ((a - b).abs() / n).max() < 0.03, (a, b)
    assert (ent_a - ent_b).abs().max() < 0.03


def test_rl_entropy_and_gradients_are_finite_with_a_restricted_head(tok):
    """A model trained with `output_vocab` scores every other token -inf; the RL loss's entropy term was
    0 x -inf = nan there, which made every update nan."""
    from streamvln.rl.logprob import sequence_logprobs

    agent = StreamingAgent(tiny(MOVES), tok, AgentConfig(num_frames=8, num_history=4, image_size=112,
                                                         max_new_tokens=5))
    agent.reset(0, "ep", "Walk to the red ball and stop next to it.")
    agent.act(frames(5, 1))
    env = agent.envs[0]
    logp, entropy, nll = sequence_logprobs(agent, [(list(env.frames), list(env.last_context), list(env.last_tokens))],
                                           1.0)
    assert torch.isfinite(logp).all() and torch.isfinite(nll).all()
    assert 0 < float(entropy.detach()) <= np.log(len(MOVES)) + 1e-5  # over the 5 tokens the head knows
    (logp.sum() - 0.02 * entropy.sum()).backward()
    grads = [p.grad for p in agent.net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_vla_action_heads_in_bf16_match_fp32(manip_shards):
    from test_manip import TINY_VLA, build_model_from

    from streamvln.data import build_loader
    from streamvln.data.config import MixConfig, TaskMix

    root, _ = manip_shards
    mix = MixConfig(tasks=[TaskMix(name="m", shards=[str(root / "shards" / "manip")])], image_size=28, batch_size=2,
                    uint8_images=True)
    batch = next(iter(build_loader(mix)))
    for head in ("lstm", "fc", "gpt", "discrete"):
        model = build_model_from(TINY_VLA, head=head).eval()
        with torch.no_grad():
            a = model(**batch)
            chunk_a = model.predict(batch["images"], batch["input_ids"], batch["attention_mask"])
            model.to(torch.bfloat16)
            b = model(**batch)
            chunk_b = model.predict(batch["images"], batch["input_ids"], batch["attention_mask"])
        assert chunk_b.dtype == torch.bfloat16 and b["pred_actions"].dtype == torch.bfloat16, head
        scale = a["pred_actions"].abs().max()
        assert (a["pred_actions"] - b["pred_actions"].float()).abs().max() < 0.05 * scale, head
        assert (chunk_a - chunk_b.float()).abs().max() < 0.05 * scale, head
        assert abs(a["loss"].item() - b["loss"].item()) < 0.01 * abs(a["loss"].item()), head


@pytest.mark.slow
def test_a_bf16_training_run_matches_fp32_losses_and_weight_updates(tmp_path, tokenizer_dir):
    """`bf16: true` on CPU is DeepSpeed's bf16 (ZeRO-2 keeps fp32 master weights): 4 steps give the fp32 run's
    losses, and the weights move as the fp32 run's do (the export is bf16, as the reference's)."""
    from conftest import episode, write_source
    from pipeline.config import NavShardConfig
    from pipeline.nav import run_nav
    from safetensors.torch import load_file
    from test_train import TINY

    from streamvln.model.build import build_model

    a = write_source(tmp_path / "data", "A",
                     [episode(i, 20 + 7 * i, ("Go to the sofa.", "Walk left.")) for i in range(6)])
    run_nav([a], tmp_path / "shards", NavShardConfig(image_size=56, samples_per_shard=4), tokenizer_dir, progress=False)
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(TINY))
    mix = {"tasks": [{"name": "nav", "shards": [str(tmp_path / "shards" / "nav")]}], "batch_size": 2,
           "image_size": 56, "augment": False, "uint8_images": True}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mix))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    runs = {}
    for bf16 in (False, True):
        train = {"model_config": str(tmp_path / "model.yaml"), "max_steps": 4, "lr": 1e-3, "vision_lr": 1e-3,
                 "warmup_ratio": 0.0, "grad_accum": 1, "bf16": bf16, "gradient_checkpointing": False,
                 "num_workers": 0, "log_every": 1, "save_every": 100}
        (tmp_path / f"train_{bf16}.yaml").write_text(yaml.safe_dump(train))
        out = tmp_path / f"run_{bf16}"
        r = subprocess.run([sys.executable, "-m", "streamvln.train", "--shards", str(tmp_path / "mix.yaml"),
                            "--config", str(tmp_path / f"train_{bf16}.yaml"), "--output-dir", str(out)],
                           capture_output=True, text=True, env=env, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-4000:]
        losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[bf16] = losses, load_file(out / "final" / "model.safetensors")
    (fp_losses, fp), (bf_losses, bf) = runs[False], runs[True]
    assert {t.dtype for t in bf.values()} == {torch.bfloat16} and {t.dtype for t in fp.values()} == {torch.float32}
    assert bf_losses == pytest.approx(fp_losses, rel=1e-3) and bf_losses[-1] < bf_losses[0]
    torch.manual_seed(0)  # the trainer's seed: the initial weights both runs started from
    init = build_model(str(tmp_path / "model.yaml"), None).state_dict()
    d_fp = torch.cat([(fp[k].double() - init[k].double()).flatten() for k in fp])
    d_bf = torch.cat([(bf[k].double() - init[k].double()).flatten() for k in fp])
    # the update agrees to a few percent (bf16 rounding of weights and gradients; Adam's sign-like steps
    # on near-zero gradients), and is nothing like a run that did not train
    assert d_fp.norm() > 0 and (d_bf - d_fp).norm() / d_fp.norm() < 0.1
