"""Evaluate: teacher-forced loss and accuracy per task (answers, and next actions against the majority baseline)."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice
from pathlib import Path

import click
import torch

from streamvln.data.collate import to_device

# Qwen2 ids of the four action symbols (reference section 4): the positions scored are those whose
# target is one of them; the prediction is the argmax over the whole vocabulary.
ACTIONS = {76286: "FORWARD", 71858: "LEFT", 51018: "RIGHT", 50669: "STOP"}


@torch.no_grad()
def evaluate(model, loader, task_names: list[str], max_batches: int | None = None, device="cpu",
             word_ids: list[int] | None = None) -> dict:
    if hasattr(model, "count_targets"):  # the VLA model: actions, not tokens
        return evaluate_actions(model, loader, max_batches, device)
    return evaluate_tokens(model, loader, task_names, max_batches, device, word_ids)


@torch.no_grad()
def evaluate_actions(model, loader, max_batches: int | None = None, device="cpu") -> dict:
    """Manipulation windows, per task and overall: arm L1 (normalised space: [-1, 1] per dimension) and gripper
    accuracy, on the first action of each step's chunk (the one executed) and over the whole chunk; loss.
    Baselines: the zero arm action and the most common gripper state."""
    model.eval()
    stats: dict[str, Counter] = {}
    for batch in islice(loader, max_batches):
        batch = to_device(batch, device)
        out = model(**batch)
        target, mask, pred = batch["actions"].float(), batch["action_mask"].bool(), out["pred_actions"].float()
        arm_err = (pred[..., :6] - target[..., :6]).abs().mean(-1)
        zero_err = target[..., :6].abs().mean(-1)
        grip_ok = ((pred[..., 6] > 0.5) == (target[..., 6] > 0.5)).float()
        for i, task in enumerate(batch["manip_tasks"]):
            for name in (task, "all"):
                s = stats.setdefault(name, Counter())
                m, first = mask[i], mask[i, :, 0]
                s.update(samples=1, loss=float(out["sample_loss_sum"][i]), targets=int(out["sample_tokens"][i]),
                         positions=int(m.sum()), arm_l1=float(arm_err[i][m].sum()), zero_l1=float(zero_err[i][m].sum()),
                         grip=float(grip_ok[i][m].sum()), open=float((target[i, ..., 6][m] > 0.5).sum()),
                         first=int(first.sum()), first_arm_l1=float(arm_err[i, :, 0][first].sum()),
                         first_zero_l1=float(zero_err[i, :, 0][first].sum()), first_grip=float(grip_ok[i, :, 0][first].sum()))
    model.train()
    per_task = {}
    for name, s in sorted(stats.items()):
        n, f = max(s["positions"], 1), max(s["first"], 1)
        per_task[name] = {"samples": s["samples"], "loss": s["loss"] / max(s["targets"], 1),
                          "arm_l1_first": s["first_arm_l1"] / f, "gripper_accuracy_first": s["first_grip"] / f,
                          "arm_l1_chunk": s["arm_l1"] / n, "gripper_accuracy_chunk": s["grip"] / n,
                          "zero_action_arm_l1_first": s["first_zero_l1"] / f, "zero_action_arm_l1_chunk": s["zero_l1"] / n,
                          "majority_gripper_accuracy": max(s["open"], s["positions"] - s["open"]) / n}
    return {"actions_scored": 0, "manipulation": per_task, "per_task": {}, "per_action": {}}


@torch.no_grad()
def evaluate_tokens(model, loader, task_names: list[str], max_batches: int | None = None, device="cpu",
                    word_ids: list[int] | None = None) -> dict:
    """Per mix task: loss and accuracy over every labelled token, and the share of samples whose every labelled
    token is right (teacher-forced: every answer and the always-labelled tokens around the turns); for action
    tokens also next-action accuracy; with word_ids, accuracy where the target is one of those tokens (the
    words that carry an answer, e.g. colours: the rest of an answer is mostly predictable boilerplate)."""
    model.eval()
    hits, seen, by_action, hits_by_action = Counter(), Counter(), Counter(), Counter()
    tokens, right, loss, samples, exact = Counter(), Counter(), Counter(), Counter(), Counter()
    word_hits, word_seen = Counter(), Counter()
    action_ids, word_ids = torch.tensor(list(ACTIONS)), torch.tensor(word_ids or [], dtype=torch.long)
    for batch in islice(loader, max_batches):
        batch = to_device(batch, device)
        out = model(**batch)
        targets, predictions = out["targets"].cpu(), out["predictions"].cpu()
        owner = out["sample_of_token"].cpu()
        mix_ids = batch["mix_ids"].cpu()
        correct = torch.zeros(len(mix_ids)).index_add(0, owner, (targets == predictions).float())
        for i, task in enumerate(mix_ids.tolist()):
            name, n = task_names[task], int(out["sample_tokens"][i])
            tokens[name] += n
            right[name] += int(correct[i])
            loss[name] += float(out["sample_loss_sum"][i])
            samples[name] += 1
            exact[name] += n > 0 and int(correct[i]) == n
        tasks = mix_ids[owner]
        words = torch.isin(targets, word_ids)
        for ok, task in zip((targets == predictions)[words].tolist(), tasks[words].tolist()):
            word_seen[task_names[task]] += 1
            word_hits[task_names[task]] += ok
        scored = torch.isin(targets, action_ids)
        for target, pred, task in zip(targets[scored].tolist(), predictions[scored].tolist(), tasks[scored].tolist()):
            name, action = task_names[task], ACTIONS[target]
            seen[name] += 1
            hits[name] += target == pred
            by_action[action] += 1
            hits_by_action[action] += target == pred
    model.train()
    total = sum(seen.values())
    majority, majority_count = by_action.most_common(1)[0] if by_action else ("-", 0)
    per_task = {}
    for t in sorted(samples):
        per_task[t] = {"samples": samples[t], "tokens": tokens[t], "loss": loss[t] / max(tokens[t], 1),
                       "token_accuracy": right[t] / max(tokens[t], 1), "exact_samples": exact[t] / samples[t]}
        if seen[t]:
            per_task[t].update(accuracy=hits[t] / seen[t], actions=seen[t])
        if word_seen[t]:
            per_task[t].update(word_accuracy=word_hits[t] / word_seen[t], words=word_seen[t])
    return {
        "actions_scored": total,
        "accuracy": sum(hits.values()) / total if total else 0.0,
        "majority_action": majority,
        "majority_baseline": majority_count / total if total else 0.0,
        "per_task": per_task,
        "per_action": {a: {"accuracy": hits_by_action[a] / by_action[a], "actions": by_action[a]}
                       for a in sorted(by_action)},
    }


def format_report(result: dict) -> str:
    lines = []
    for t, v in result.get("manipulation", {}).items():
        lines.append(f"  {t:28s} first action: arm L1 {v['arm_l1_first']:.4f} (zero action {v['zero_action_arm_l1_first']:.4f}), "
                     f"gripper {v['gripper_accuracy_first']:.3f} (majority {v['majority_gripper_accuracy']:.3f}); "
                     f"chunk: arm L1 {v['arm_l1_chunk']:.4f}, gripper {v['gripper_accuracy_chunk']:.3f}; "
                     f"loss {v['loss']:.4f} ({v['samples']} windows)")
    if result["actions_scored"]:
        lines.append(f"next-action accuracy {result['accuracy']:.3f} over {result['actions_scored']} actions; "
                     f"majority baseline ({result['majority_action']}) {result['majority_baseline']:.3f}; "
                     f"gain {100 * (result['accuracy'] - result['majority_baseline']):+.1f} points")
    for t, v in result["per_task"].items():
        actions = f", next action {v['accuracy']:.3f} ({v['actions']} actions)" if "accuracy" in v else ""
        actions += f", answer words {v['word_accuracy']:.3f} ({v['words']})" if "word_accuracy" in v else ""
        lines.append(f"  task {t:10s} loss {v['loss']:.3f}, token accuracy {v['token_accuracy']:.3f} "
                     f"({v['tokens']} tokens), samples all right {v['exact_samples']:.3f} ({v['samples']} samples)"
                     f"{actions}")
    lines += [f"  action {a:8s} {v['accuracy']:.3f} ({v['actions']} actions)" for a, v in result["per_action"].items()]
    return "\n".join(lines)


def answer_word_ids(tokenizer_dir: str, words: list[str]) -> list[int]:
    """The first token of each word, written alone and after a space (how it appears inside a sentence)."""
    from pipeline.qwen_tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    ids = set()
    for word in (w.strip() for w in words if w.strip()):
        for text in (word, " " + word):
            ids.add(tok(text, add_special_tokens=False)["input_ids"][0])
    if not ids:
        raise ValueError("--words names no word")
    return sorted(ids)


@click.command()
@click.option("--checkpoint", required=True, type=click.Path(file_okay=False, exists=True),
              help="An exported model directory (e.g. runs/demo/final).")
@click.option("--shards", "mix_path", required=True, type=click.Path(dir_okay=False, exists=True),
              help="Data-mix YAML of the held-out shards (e.g. configs/data/demo_val.yaml).")
@click.option("--max-batches", type=int, help="Stop after this many batches [one epoch].")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Also write the result as JSON.")
@click.option("--words", help="Comma-separated answer words (e.g. red,green,left): also report the accuracy where "
                              "the target is one of them (with or without a leading space), per task.")
def main(checkpoint, mix_path, max_batches, out_path, words):
    """Teacher-forced accuracy of a model on held-out shards: per task (tokens, answer words) and per action."""
    from streamvln.data import build_loader, load_mix
    from streamvln.model.build import build_model

    from pipeline.config import ConfigError

    try:
        mix = load_mix(mix_path, finite=True)
        model = build_model(None, checkpoint)
        word_ids = answer_word_ids(checkpoint, words.split(",")) if words else None
    except (ConfigError, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    result = evaluate(model, build_loader(mix), [t.name for t in mix.tasks], max_batches, word_ids=word_ids)
    click.echo(format_report(result))
    if out_path:
        Path(out_path).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
