"""tools/binding_probe: the colour word is swapped everywhere in a sample, for another colour, and nothing else."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

import torch
import yaml

from streamvln.evaluate import ACTIONS
from streamvln.model.config import StreamVLNConfig
from streamvln.model.modeling import StreamVLNForCausalLM

ROOT = Path(__file__).resolve().parent.parent
TEXT = "Walk to the red ball and stop next to it. The red ball is ahead."


def load_tool():
    loader = importlib.machinery.SourceFileLoader("binding_probe", str(ROOT / "tools" / "binding_probe"))
    spec = importlib.util.spec_from_loader("binding_probe", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def batch_of(tok, texts):
    """Text-only samples whose every action token is labelled (no frames: the model embeds text alone)."""
    forward, left = (next(k for k, v in ACTIONS.items() if v == name) for name in ("FORWARD", "LEFT"))
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [forward, forward, left, forward] for t in texts]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tok.pad_token_id or 0)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), True
    labels = torch.where(torch.isin(ids, torch.tensor(list(ACTIONS))) & mask, ids, -100)
    zeros = torch.zeros(len(rows), dtype=torch.long)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "images": None, "n_images": zeros,
            "n_history": zeros, "mix_ids": zeros}


def test_swap_replaces_every_occurrence_of_the_named_colour_and_nothing_else(tok, tokenizer_dir):
    tool = load_tool()
    colours = tool.colour_ids(str(tokenizer_dir))
    assert len(colours) == 6
    batch = batch_of(tok, [TEXT, "Walk to the ball and stop next to it."])
    swapped = tool.swap_colours(batch["input_ids"], colours, torch.Generator().manual_seed(0))
    red = tok(" red", add_special_tokens=False)["input_ids"][0]
    changed = swapped[0] != batch["input_ids"][0]
    assert int(changed.sum()) == 2 and (batch["input_ids"][0][changed] == red).all()
    new = swapped[0][changed]
    assert new[0] == new[1] and int(new[0]) != red and int(new[0]) in colours.tolist()
    assert torch.equal(swapped[1], batch["input_ids"][1])  # no colour named: left as it is
    again = tool.swap_colours(batch["input_ids"], colours, torch.Generator().manual_seed(0))
    assert torch.equal(swapped, again)


def test_probe_scores_the_same_batches_with_and_without_the_swap(tok, tokenizer_dir):
    tool = load_tool()
    torch.manual_seed(0)
    cfg = StreamVLNConfig(**yaml.safe_load((ROOT / "configs/model/tiny.yaml").read_text()), attn_implementation="sdpa")
    model = StreamVLNForCausalLM(cfg)
    colours = tool.colour_ids(str(tokenizer_dir))
    named = tool.probe(model, [batch_of(tok, [TEXT])], colours, batches=1)
    plain = tool.probe(model, [batch_of(tok, ["Walk to the ball and stop next to it."])], colours, batches=1)
    assert named["as written"]["actions"] == named["colour swapped"]["actions"] == 4
    assert named["as written"]["loss"] != named["colour swapped"]["loss"]  # the model saw another word
    assert plain["as written"] == plain["colour swapped"]  # nothing to swap: the same inputs, the same scores
