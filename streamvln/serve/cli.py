"""`streamvln-serve` (the service), `streamvln-serve drive-sim` (simulator episodes through it), `... token`."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import click
import numpy as np
import yaml

from pipeline.config import ConfigError, load_config

from .config import ServeConfig
from .server import TokenError, read_token


def _token(path) -> str:
    try:
        token, created = read_token(path)
    except TokenError as e:
        raise click.ClickException(str(e)) from None
    if created:
        click.echo(f"wrote a new token to {path} (mode 600); clients send it as 'Authorization: Bearer <token>'",
                   err=True)
    return token


@click.command(name="streamvln-serve", epilog="Also: `streamvln-serve drive-sim --help`, `streamvln-serve token "
                                              "--help`. Protocol and numbers: docs/serve.md.")
@click.option("--checkpoint", required=True, type=click.Path(file_okay=False, exists=True),
              help="StreamVLN checkpoint directory (as streamvln-train exports it)")
@click.option("--token-file", required=True, type=click.Path(dir_okay=False),
              help="file holding the bearer token; created (mode 600) with a random token when missing")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True),
              help="ServeConfig YAML (configs/serve/default.yaml); the options below override it")
@click.option("--host", default=None, help="bind address [127.0.0.1]; anything else exposes the robot's controller")
@click.option("--port", type=int, default=None, help="[8000]")
@click.option("--max-sessions", type=int, default=None, help="open sessions at most (429 past it) [16]")
@click.option("--idle-timeout", "idle_timeout_s", type=float, default=None, help="seconds before an idle session "
              "closes [300]")
@click.option("--batch-wait-ms", type=float, default=None, help="wait for other sessions' steps [2]")
@click.option("--max-batch", type=int, default=None, help="sessions per model call, 0 = all waiting [0]")
@click.option("--max-upload-bytes", type=int, default=None, help="[4000000]")
@click.option("--reference-route", is_flag=True, default=None, help="also serve the reference's POST /eval_vln")
@click.option("--instruction", default=None, help="the reference route's instruction (needed with it)")
@click.option("--session-log", type=click.Path(file_okay=False), default=None,
              help="write each session's frames and actions under this folder (off by default)")
@click.option("--num-frames", type=int, default=None, help="agent window length [32]")
@click.option("--num-history", type=int, default=None, help="agent memory frames [8]")
@click.option("--reference-memory-text", is_flag=True, default=None, help="the reference eval's memory sentence")
@click.option("--max-new-tokens", type=int, default=None, help="tokens an answer may have [24]")
@click.option("--seed", type=int, default=None, help="agent seed [0]")
def serve_cmd(checkpoint, token_file, config_path, **options):
    """Serve the streaming agent over HTTP: sessions of frames in, actions out, batched across sessions."""
    try:
        cfg = load_config(ServeConfig, config_path, options)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    token = _token(token_file)
    if not cfg.is_loopback():
        click.echo(f"warning: binding {cfg.host}: robots on the network can reach this service; put a TLS proxy "
                   f"in front of it (docs/serve.md)", err=True)
    import uvicorn

    from .app import create_app
    from .server import build_engine, uvicorn_config
    engine = build_engine(checkpoint, cfg)
    resolved = {"checkpoint": str(checkpoint), **dataclasses.asdict(cfg)}
    if cfg.session_log:
        Path(cfg.session_log).mkdir(parents=True, exist_ok=True)
        (Path(cfg.session_log) / "serve_config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    click.echo(f"streamvln-serve: http://{cfg.host}:{cfg.port} ({cfg.max_sessions} sessions, idle timeout "
               f"{cfg.idle_timeout_s:g} s, reference route {'on' if cfg.reference_route else 'off'})", err=True)
    try:
        uvicorn.Server(uvicorn_config(create_app(engine, token), cfg)).run()
    finally:
        engine.shutdown()


@click.command(name="streamvln-serve drive-sim")
@click.option("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
@click.option("--token-file", required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--episodes", "episodes_path", required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--output", required=True, type=click.Path(file_okay=False))
@click.option("--clients", default=1, show_default=True, help="simulators driven at once, one session each")
@click.option("--max-episodes", type=int, default=None)
@click.option("--every", default=1, show_default=True)
@click.option("--width", default=640, show_default=True)
@click.option("--height", default=480, show_default=True)
@click.option("--max-steps", default=500, show_default=True)
@click.option("--image-format", type=click.Choice(["png", "jpeg"]), default="png", show_default=True,
              help="png is lossless: the same actions as an in-process evaluation; jpeg is what a camera sends")
@click.option("--chunk", is_flag=True, help="the reference robot's protocol: chunk sessions, each answer's chunk "
                                            "played out blind before the next frame is posted")
def drive_cmd(url, token_file, episodes_path, output, clients, max_episodes, every, width, height, max_steps,
              image_format, chunk):
    """Drive the simulator's episodes through the HTTP API, --clients at once; writes result.jsonl and
    summary.json as streamvln-nav-eval does (resumable), plus the clients' step latencies."""
    from streamvln.nav_eval import _key, load_done, run_episodes, write_summary
    from streamvln.sim.base import SimConfig
    from streamvln.sim.episodes import EpisodeFileError, read_episodes
    from streamvln.sim.miniworld_sim import MiniWorldSim

    from .client import HttpPolicy, ServeClient
    token, _ = read_token(token_file, create=False)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    try:
        episodes = read_episodes(episodes_path)[::every][:max_episodes]
    except EpisodeFileError as e:
        raise click.ClickException(str(e)) from None
    done = load_done(output)
    todo = [ep for ep in episodes if _key(ep.scene_id, ep.episode_id) not in done]
    client = ServeClient(url, token)
    client.health()
    policy = HttpPolicy(client, clients, image_format, chunk=chunk)
    t0 = time.perf_counter()
    if todo:
        sims = [MiniWorldSim(SimConfig(width=width, height=height, max_steps=max_steps)) for _ in range(clients)]
        try:
            run_episodes(sims, policy, todo, output)
        finally:
            policy.close()
            for s in sims:
                s.close()
    wall = time.perf_counter() - t0
    steps = {"n": len(policy.latencies), "wall_s": round(wall, 3)}
    if policy.latencies:
        lat = np.asarray(policy.latencies) * 1000
        steps.update({"steps_per_s": round(len(lat) / wall, 3), "p50_ms": round(float(np.percentile(lat, 50)), 2),
                      "p99_ms": round(float(np.percentile(lat, 99)), 2)})
    write_summary(output, episodes, episodes_path, "served",
                  {"url": url, "clients": clients, "image_format": image_format, "chunk": chunk, "max_steps": max_steps,
                   "every": every, "max_episodes": max_episodes, "client_steps": steps})
    client.close()


@click.command(name="streamvln-serve token")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="token file to create (mode 600)")
def token_cmd(out):
    """Write a new random bearer token to a file only you can read."""
    if Path(out).exists():
        raise click.ClickException(f"{out} exists: remove it first to replace the token")
    _token(out)
    click.echo(f"wrote {out}")


def main():
    cmds = {"drive-sim": drive_cmd, "token": token_cmd}
    if sys.argv[1:2] and sys.argv[1] in cmds:
        cmds[sys.argv[1]](sys.argv[2:], prog_name=f"streamvln-serve {sys.argv[1]}")
    else:
        serve_cmd()


if __name__ == "__main__":
    main()
