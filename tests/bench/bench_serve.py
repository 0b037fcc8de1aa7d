"""Service benchmark: 1, 4 and 8 simulator clients through streamvln-serve on a loopback port; decisions/s, p50/p99
step latency, and the gain of batching the waiting sessions over deciding them one model call each."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
import yaml

from pipeline.qwen_tokenizer import load_tokenizer
from streamvln.agent.rollout import rollout
from streamvln.model.config import StreamVLNConfig
from streamvln.model.modeling import StreamVLNForCausalLM
from streamvln.serve.client import HttpPolicy, ServeClient, encode_frame
from streamvln.sim.base import SimConfig
from streamvln.sim.episodes import EpisodeGenConfig, generate_episodes
from streamvln.sim.miniworld_sim import MiniWorldSim

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "bench-token-0123456789abcdef"
MOVES = [76286, 71858, 51018]  # ↑ ← →: a random head that walks and turns, never STOPs, answers max_new_tokens
MAX_STEPS = 80  # frames each independent robot posts
SIM_STEPS = 240  # simulator steps a drive-sim episode runs (a frame posted every 6)


def checkpoint(out: Path) -> Path:
    """The demo-size model (configs/model/tiny.yaml) with random weights and a head over the moves only: every
    episode runs to its step limit, so batched and serial runs do the same work (their actions are equal, checked).
    Answers are 6 moves: a chunk session decides once per 6 steps in drive-sim (the reference robot plays the
    chunk out blind) and at every posted frame for the independent robots."""
    torch.manual_seed(0)
    cfg = yaml.safe_load((ROOT / "configs/model/tiny.yaml").read_text())
    cfg["initializer_range"] = 0.1
    model = StreamVLNForCausalLM(StreamVLNConfig(**cfg))
    model.set_output_vocab(MOVES)
    model.save_pretrained(out)
    load_tokenizer(ROOT / "build" / "qwen2_tokenizer").save_pretrained(out)
    return out


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@contextlib.contextmanager
def server(ckpt: Path, token_file: Path, n: int, max_batch: int, batch_wait_ms: float = 2.0):
    """`streamvln-serve` in its own process, as deployed (the clients' rendering and encoding do not share its
    interpreter); yields its URL. A random head writes no <|im_end|>: answers are capped at 6 tokens, as
    bench_agent does (a trained model writes about 6: four actions, then the end)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "streamvln-serve"), "--checkpoint", str(ckpt), "--token-file",
           str(token_file), "--port", str(port), "--max-sessions", str(n), "--max-batch", str(max_batch),
           "--batch-wait-ms", str(batch_wait_ms),
           "--num-frames", "32", "--num-history", "8", "--max-new-tokens", "6"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                sys.exit(f"streamvln-serve exited: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        warm = ServeClient(url, TOKEN)  # the first model calls (allocations, kernels) are not measured
        session = warm.create("Warm up.", chunk=True)
        for k in range(3):
            session.step(np.full((168, 224, 3), 40 * k, np.uint8))
        session.close()
        warm.close()
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def summarise(latencies: list[float], wall: float, before: str, after: str) -> dict:
    """Client-side latencies and wall time; the server's decisions and model calls made in between."""
    lat = np.asarray(latencies) * 1000
    calls = metric(after, "streamvln_model_calls_total") - metric(before, "streamvln_model_calls_total")
    decisions = metric(after, "streamvln_decisions_total") - metric(before, "streamvln_decisions_total")
    return {"steps": len(lat), "decisions": decisions, "decisions_s": decisions / wall,
            "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "batch": decisions / max(calls, 1), "wall": wall}


class TimedPolicy(HttpPolicy):
    """drive-sim's policy, timing its calls: the time the clients wait on the server (rendering and played-out
    chunks excluded, so the order of runs, whose first scene builds fill the renderer's caches, does not
    count)."""

    waited = 0.0

    def act(self, observations, active):
        t = time.perf_counter()
        out = super().act(observations, active)
        self.waited += time.perf_counter() - t
        return out


def drive_sim(ckpt: Path, token_file: Path, n: int, max_batch: int, episodes, batch_wait_ms: float = 2.0):
    """What `streamvln-serve drive-sim --clients n` does: n simulators (224x168, rendered here) step in lockstep,
    each frame posted as PNG from its own thread. Returns the numbers and each episode's actions."""
    with server(ckpt, token_file, n, max_batch, batch_wait_ms) as url:
        client = ServeClient(url, TOKEN)
        policy = TimedPolicy(client, n, chunk=True)
        sims = [MiniWorldSim(SimConfig(width=224, height=168, max_steps=SIM_STEPS)) for _ in range(n)]
        before = client.metrics()
        results = list(rollout(sims, policy, episodes[:n]))
        wall = policy.waited
        policy.close()
        for s in sims:
            s.close()
        out = summarise(policy.latencies, wall, before, client.metrics())
        client.close()
    return out, [r.actions for r in sorted(results, key=lambda r: r.episode.episode_id)]


def independent(ckpt: Path, token_file: Path, n: int, max_batch: int) -> dict:
    """n robots that do not wait for each other: each thread posts its next (pre-encoded 224x168 PNG) frame as
    soon as it has the answer, after a 5 ms 'actuation' pause, so sessions arrive at the server at their own times."""
    rng = np.random.default_rng(0)
    stream = [encode_frame(rng.integers(0, 256, (168, 224, 3), dtype=np.uint8))[0] for _ in range(MAX_STEPS)]
    with server(ckpt, token_file, n, max_batch) as url:
        client = ServeClient(url, TOKEN)
        sessions = [client.create("Walk to the red ball and stop next to it.", episode=f"robot{i}", chunk=True)
                    for i in range(n)]
        latencies: list[float] = []
        lock = threading.Lock()

        def robot(s):
            for k in range(MAX_STEPS):
                t0 = time.perf_counter()
                s.step(stream[k])
                with lock:
                    latencies.append(time.perf_counter() - t0)
                time.sleep(0.005)

        threads = [threading.Thread(target=robot, args=(s,)) for s in sessions]
        before = client.metrics()
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        out = summarise(latencies, wall, before, client.metrics())
        client.close()
    return out


def line(label: str, r: dict) -> str:
    return (f"{label}: {r['decisions_s']:6.1f} decisions/s, step latency p50 {r['p50']:6.1f} ms p99 "
            f"{r['p99']:6.1f} ms, {r['batch']:.2f} sessions per model call ({r['steps']} step requests, "
            f"{int(r['decisions'])} decisions, {r['wall']:.1f} s)")


def main():
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    ckpt = checkpoint(tmp / "ckpt")
    token_file = tmp / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    episodes, _ = generate_episodes(EpisodeGenConfig(tier="room", split="val_unseen", scenes=8, per_scene=1, seed=3))
    print(f"streamvln-serve (its own process) on 127.0.0.1, demo-size model (random weights, moves-only head, "
          f"6-move answers), chunk sessions (every step request is a decision); server and clients share "
          f"{torch.get_num_threads()} CPU threads")
    print(f"drive-sim: simulators in lockstep, {SIM_STEPS} steps an episode, each chunk played out before the next "
          f"frame is posted; rates over the time the clients wait on the server")
    for n in (1, 4, 8):
        serial, acts_s = drive_sim(ckpt, token_file, n, 1, episodes)
        batched, acts_b = drive_sim(ckpt, token_file, n, 0, episodes)
        if acts_b != acts_s:
            sys.exit(f"N={n}: batched and serial sessions took different actions")
        print(line(f"drive-sim N={n} serial ", serial))
        print(line(f"drive-sim N={n} batched", batched))
        print(f"drive-sim N={n}: batching gain {batched['decisions_s'] / serial['decisions_s']:.2f}x decisions/s, "
              f"p50 latency {serial['p50'] / batched['p50']:.2f}x lower")
    waited, acts_w = drive_sim(ckpt, token_file, 8, 0, episodes, batch_wait_ms=10)
    assert acts_w == acts_b
    print(line("drive-sim N=8 batched, batch_wait_ms 10", waited))
    print(f"independent: each robot posts {MAX_STEPS} frames, the next 5 ms after its answer; rates over wall time")
    for n in (4, 8):
        serial, batched = independent(ckpt, token_file, n, 1), independent(ckpt, token_file, n, 0)
        print(line(f"independent N={n} serial ", serial))
        print(line(f"independent N={n} batched", batched))
        print(f"independent N={n}: batching gain {batched['decisions_s'] / serial['decisions_s']:.2f}x decisions/s")


if __name__ == "__main__":
    main()
