"""Evaluate: teacher-forced next-action accuracy per task and per action, against the majority-action baseline."""

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
def evaluate(model, loader, task_names: list[str], max_batches: int | None = None, device="cpu") -> dict:
    model.eval()
    hits, seen, by_action, hits_by_action = Counter(), Counter(), Counter(), Counter()
    action_ids = torch.tensor(list(ACTIONS))
    for batch in islice(loader, max_batches):
        batch = to_device(batch, device)
        out = model(**batch)
        targets, predictions = out["targets"].cpu(), out["predictions"].cpu()
        tasks = batch["mix_ids"].cpu()[out["sample_of_token"].cpu()]
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
    return {
        "actions_scored": total,
        "accuracy": sum(hits.values()) / total if total else 0.0,
        "majority_action": majority,
        "majority_baseline": majority_count / total if total else 0.0,
        "per_task": {t: {"accuracy": hits[t] / seen[t], "actions": seen[t]} for t in sorted(seen)},
        "per_action": {a: {"accuracy": hits_by_action[a] / by_action[a], "actions": by_action[a]}
                       for a in sorted(by_action)},
    }


def format_report(result: dict) -> str:
    lines = [f"next-action accuracy {result['accuracy']:.3f} over {result['actions_scored']} actions; "
             f"majority baseline ({result['majority_action']}) {result['majority_baseline']:.3f}; "
             f"gain {100 * (result['accuracy'] - result['majority_baseline']):+.1f} points"]
    lines += [f"  task {t:10s} {v['accuracy']:.3f} ({v['actions']} actions)" for t, v in result["per_task"].items()]
    lines += [f"  action {a:8s} {v['accuracy']:.3f} ({v['actions']} actions)" for a, v in result["per_action"].items()]
    return "\n".join(lines)


@click.command()
@click.option("--checkpoint", required=True, type=click.Path(file_okay=False, exists=True),
              help="An exported model directory (e.g. runs/demo/final).")
@click.option("--shards", "mix_path", required=True, type=click.Path(dir_okay=False, exists=True),
              help="Data-mix YAML of the held-out shards (e.g. configs/data/demo_val.yaml).")
@click.option("--max-batches", type=int, help="Stop after this many batches [one epoch].")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Also write the result as JSON.")
def main(checkpoint, mix_path, max_batches, out_path):
    """Teacher-forced next-action accuracy of a model on held-out shards, per task and per action."""
    from streamvln.data import build_loader, load_mix
    from streamvln.model.build import build_model

    from pipeline.config import ConfigError

    try:
        mix = load_mix(mix_path, finite=True)
        model = build_model(None, checkpoint)
    except (ConfigError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    result = evaluate(model, build_loader(mix), [t.name for t in mix.tasks], max_batches)
    click.echo(format_report(result))
    if out_path:
        Path(out_path).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
