"""`streamvln-shards`: command-line entry points (option parsing only; the work is in the library)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from . import task_dir
from .config import (CalvinShardConfig, ConfigError, MMC4ShardConfig, NavShardConfig, ScanQAShardConfig,
                     VideoQAShardConfig, load_config)
from .reader import AnnotationError


@click.group()
def main():
    """Offline tools: build the tokenizer, write demo data, write WebDataset shards per task."""


@main.command()
@click.option("--tiktoken", "tiktoken_file", default="build/qwen.tiktoken", show_default=True,
              type=click.Path(dir_okay=False), help="Qwen's BPE ranks (from the dashscope wheel).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Tokenizer directory to write.")
def tokenizer(tiktoken_file, out):
    """Build a transformers Qwen2 tokenizer directory locally from qwen.tiktoken."""
    from .qwen_tokenizer import build_qwen2_tokenizer

    try:
        build_qwen2_tokenizer(tiktoken_file, out)
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote Qwen2 tokenizer to {out}")


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--episodes", default=150, show_default=True, help="Training episodes per source.")
@click.option("--val-episodes", default=20, show_default=True, help="Held-out episodes per source, under val/.")
@click.option("--seed", default=0, show_default=True)
@click.option("--width", default=640, show_default=True)
@click.option("--height", default=480, show_default=True)
@click.option("--cotrain", default=80, show_default=True,
              help="Records per co-training source (video QA, ScanQA, MMC4) written beside them; 0: none.")
@click.option("--nav/--no-nav", default=True, show_default=True,
              help="Also write the pillar-world trajectories (make demo takes navigation from streamvln-sim).")
def synth(out, episodes, val_episodes, seed, width, height, cotrain, nav):
    """Write demo trajectories (R2R-like and RxR-like) and small video QA / ScanQA / MMC4 sources."""
    from .synth import write_demo

    from .synth_cotrain import write_cotrain_demo

    frames = write_demo(out, episodes=episodes, val_episodes=val_episodes, seed=seed, width=width,
                        height=height) if nav else {}
    for source, n in frames.items():
        click.echo(f"{Path(out) / source}: {n} frames")
    if cotrain:
        for name, folder in write_cotrain_demo(out, count=cotrain, val_count=max(2, cotrain // 2), seed=seed).items():
            click.echo(f"{folder}: demo {name} source")


def run_options(f):
    """The options every shard command shares (after its own)."""
    options = [
        click.option("--tokenizer", "tokenizer_path", required=True, type=click.Path(file_okay=False, exists=True),
                     help="Local tokenizer directory (Qwen2)."),
        click.option("--out", default="shards", show_default=True, type=click.Path(file_okay=False),
                     help="Shard root; the task folder <out>/<task> is written."),
        click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True),
                     help="YAML of the task's options (configs/shards/<task>.yaml); options here override it."),
        click.option("--image-size", type=int, help="Frames are resized to this square size [384]."),
        click.option("--jpeg-quality", type=int, help="[95]"),
        click.option("--samples-per-shard", type=int, help="Target samples per shard [256]."),
        click.option("--max-tokens", type=int, help="Reject longer samples [32768]."),
        click.option("--seed", type=int, help="[0]"),
        click.option("--split", help="Shard name prefix, e.g. train or val [train]."),
        click.option("--workers", default=1, show_default=True, help="Processes writing shards."),
        click.option("--part", default=0, show_default=True, help="This run's part (e.g. $SLURM_ARRAY_TASK_ID)."),
        click.option("--num-parts", default=1, show_default=True, help="Disjoint parts the shards are split into."),
        click.option("--overwrite", is_flag=True, help="Delete this split's shards first instead of resuming."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@main.command()
@click.option("--src", "sources", multiple=True, required=True, type=click.Path(file_okay=False, exists=True),
              help="Source folder with annotations.json and images/ (repeatable).")
@run_options
@click.option("--num-frames", type=int, help="F, actions per sample [32].")
@click.option("--num-future-steps", type=int, help="K, actions per assistant turn [4].")
@click.option("--num-history", type=int, help="H, history frames [8].")
@click.option("--remove-init-turns/--keep-init-turns", default=None, help="Drop leading turn-only steps [keep].")
@click.option("--history-mode", type=click.Choice(["exact", "reference"]), help="[exact]")
@click.option("--frame-storage", type=click.Choice(["episode", "sample"]),
              help="episode: each frame once per episode, referenced by byte range; sample: copies per sample [episode].")
def nav(sources, tokenizer_path, out, config_path, workers, part, num_parts, overwrite, quiet, **options):
    """Write navigation shards from StreamVLN trajectory folders (resumes an interrupted run)."""
    from .nav import run_nav
    from .task_dir import PlanMismatch

    try:
        cfg = load_config(NavShardConfig, config_path, options)
        summary = run_nav(sources, out, cfg, tokenizer_path, workers=workers, part=part, num_parts=num_parts,
                          overwrite=overwrite, progress=not quiet)
    except (ConfigError, AnnotationError, PlanMismatch, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(format_summary(summary))


def _run_cotrain(task, cfg_class, inputs, root, tokenizer_path, out, config_path, workers, part, num_parts,
                 overwrite, quiet, options):
    from .convo_reader import DatasetSpec, load_data_config
    from .cotrain import run_cotrain
    from .task_dir import PlanMismatch

    try:
        cfg = load_config(cfg_class, config_path, options)
        files, data_config = inputs
        if bool(files) == bool(data_config):
            raise click.UsageError("give --json/--jsonl files or --data-config, not both or neither")
        specs = load_data_config(data_config) if data_config else [DatasetSpec(str(f)) for f in files]
        jobs = [(spec.json_path, spec if data_config else None) for spec in specs]
        summary = run_cotrain(task, jobs, root, out, cfg, tokenizer_path, workers=workers, part=part,
                              num_parts=num_parts, overwrite=overwrite, progress=not quiet)
    except (ConfigError, AnnotationError, PlanMismatch, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(format_summary(summary))


@main.command()
@click.option("--json", "files", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help="LLaVA-Video-178K-style conversation JSON (repeatable).")
@click.option("--data-config", type=click.Path(dir_okay=False, exists=True),
              help="Or a data-config YAML: json_path, sampling_strategy, sampling_subset per file.")
@click.option("--video-root", required=True, type=click.Path(file_okay=False, exists=True),
              help="Videos are <video-root>/<data_source>/<video>.")
@run_options
@click.option("--frames-upbound", type=int, help="At most this many frames, by linspace; 0: no bound [32].")
@click.option("--video-fps", type=int, help="Frames kept per second before the bound [1].")
@click.option("--force-sample/--no-force-sample", default=None, help="Always frames_upbound frames [no].")
@click.option("--add-time-instruction/--no-time-instruction", default=None,
              help="Prefix the reference's video-length and frame-time text [no].")
@click.option("--image-to-front/--image-in-place", default=None,
              help="A single <image> inside the first turn moves to its front, as the reference [front].")
@click.option("--remove-noisy-marker/--keep-noisy-marker", default=None,
              help="Delete QA_GT_caption_based_noisy from every turn, as the reference [remove].")
def videoqa(files, data_config, video_root, tokenizer_path, out, config_path, workers, part, num_parts, overwrite,
            quiet, **options):
    """Write video QA shards (shards/videoqa) from LLaVA-Video conversations over mp4 files, decoded by decord."""
    _run_cotrain("videoqa", VideoQAShardConfig, (files, data_config), video_root, tokenizer_path, out, config_path,
                 workers, part, num_parts, overwrite, quiet, options)


@main.command()
@click.option("--json", "files", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help="ScanQA / SQA3D conversation JSON whose `video` is a scene folder (repeatable).")
@click.option("--data-config", type=click.Path(dir_okay=False, exists=True), help="Or a data-config YAML.")
@click.option("--scene-root", required=True, type=click.Path(file_okay=False, exists=True),
              help="Scene folders are <scene-root>/<video> (posed-image JPEGs).")
@run_options
@click.option("--frame-stride", type=int, help="Keep every Nth posed image first [10].")
@click.option("--frames-upbound", type=int, help="Then take this many, repeating if too few [32].")
@click.option("--frame-sampling", type=click.Choice(["reference", "linspace"]),
              help="reference: kept[i * (len // N)] (a prefix of long scenes); linspace: the whole scene [reference].")
@click.option("--remove-noisy-marker/--keep-noisy-marker", default=None,
              help="Delete QA_GT_caption_based_noisy from every turn, as the reference [remove].")
def scanqa(files, data_config, scene_root, tokenizer_path, out, config_path, workers, part, num_parts, overwrite,
           quiet, **options):
    """Write ScanQA / SQA3D shards (shards/scanqa) from conversations over ScanNet posed-image folders."""
    _run_cotrain("scanqa", ScanQAShardConfig, (files, data_config), scene_root, tokenizer_path, out, config_path,
                 workers, part, num_parts, overwrite, quiet, options)


@main.command()
@click.option("--jsonl", "files", multiple=True, required=True, type=click.Path(dir_okay=False, exists=True),
              help="MMC4 documents, one JSON object a line (repeatable).")
@click.option("--image-root", required=True, type=click.Path(file_okay=False, exists=True),
              help="Images are <image-root>/<image_name>.")
@run_options
@click.option("--max-images", type=int, help="Images per document [6].")
@click.option("--image-choice", type=click.Choice(["reference", "sentence_order"]),
              help="reference: the first 6 listed, then by sentence; sentence_order: by sentence, then 6 [reference].")
@click.option("--sentence-join", help='Between sentences: "" glues them as the reference [""].')
def mmc4(files, image_root, tokenizer_path, out, config_path, workers, part, num_parts, overwrite, quiet, **options):
    """Write MMC4 interleaved image-text shards (shards/mmc4) from jsonl documents and their images."""
    _run_cotrain("mmc4", MMC4ShardConfig, (files, None), image_root, tokenizer_path, out, config_path,
                 workers, part, num_parts, overwrite, quiet, options)


@main.command()
@click.option("--src", required=True, type=click.Path(file_okay=False, exists=True),
              help="A CALVIN split folder (episode_XXXXXXX.npz frames, lang_annotations/auto_lang_ann.npy).")
@run_options
@click.option("--window", type=int, help="W, observation steps per sample [8].")
@click.option("--chunk", type=int, help="N, actions per step's chunk [10].")
@click.option("--skip-frames", type=int, help="Stride between sample start frames [1].")
@click.option("--use-hand-rgb/--no-hand-rgb", default=None, help="Also store the gripper camera [yes].")
@click.option("--normalization", type=click.Choice(["calvin", "q99"]),
              help="calvin: clip +-0.65 and scale; q99: q01/q99 bounds from the config [calvin].")
@click.option("--source", help="Source name in the index [the split folder's parent's name].")
def calvin(src, tokenizer_path, out, config_path, workers, part, num_parts, overwrite, quiet, **options):
    """Write manipulation shards (shards/manip) from a CALVIN-format split: RoboVLMs' windows and action chunks."""
    from .manip import run_calvin
    from .task_dir import PlanMismatch

    try:
        cfg = load_config(CalvinShardConfig, config_path, options)
        summary = run_calvin(src, out, cfg, tokenizer_path, workers=workers, part=part, num_parts=num_parts,
                             overwrite=overwrite, progress=not quiet)
    except (ConfigError, AnnotationError, PlanMismatch, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(format_summary(summary))


def format_summary(summary: dict) -> str:
    lines = [f"{summary['out']} [{summary['split']}]: {summary['shards_written']} shards written, "
             f"{summary['shards_skipped']} already done, {summary['shards_planned']} planned"]
    manifest = summary["manifest"]
    if manifest is None:
        lines.append(f"{summary['shards_missing']} shards of this split are still to be written by other parts")
        return "\n".join(lines)
    c = manifest["counts"]
    unit = {"nav": "episodes", "manip": "spans"}.get(summary["task"], "records")
    lines.append(f"{unit}: {c['episodes_in']} in = {c['episodes_written']} written + {c['episodes_rejected']} rejected")
    lines.append(f"samples: {c['samples_written']} written, {c['samples_rejected']} rejected")
    for source, s in manifest["per_source"].items():
        lines.append(f"  {source}: {s.get('episodes_in', 0)} in, {s.get('samples_written', 0)} samples")
    for reason, n in manifest["rejects_by_reason"].items():
        lines.append(f"  rejected ({reason}): {n}")
    for source in manifest.get("sources", []):
        if source.get("subset_unmatched"):
            lines.append(f"  warning: {source['name']}: sampling_subset keyword(s) "
                         f"{', '.join(source['subset_unmatched'])} match no video path in the file")
    return "\n".join(lines)


@main.command()
@click.argument("task_folder", type=click.Path(file_okay=False, exists=True))
def merge(task_folder):
    """Merge the parts of a task folder into index.parquet, manifest.json and rejects.jsonl."""
    missing = task_dir.finalize(Path(task_folder))
    incomplete = {split: n for split, n in missing.items() if n}
    if incomplete:
        raise click.ClickException(f"shards still missing: {json.dumps(incomplete)}; run the remaining parts")
    click.echo(f"merged {', '.join(missing)} in {task_folder}")


if __name__ == "__main__":
    main()
