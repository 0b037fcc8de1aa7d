"""A small Python client of `streamvln-serve`, and `HttpPolicy`: the rollouts' policy interface over it (drive-sim)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import httpx
import numpy as np


class ServeClientError(RuntimeError):
    def __init__(self, status: int, kind: str, detail: str):
        super().__init__(f"{status} {kind}: {detail}")
        self.status, self.kind, self.detail = status, kind, detail


def encode_frame(rgb: np.ndarray, image_format: str = "png") -> tuple[bytes, str]:
    """HxWx3 RGB -> (bytes, content type). PNG is lossless: the server sees exactly these pixels."""
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    if image_format == "png":
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        kind = "image/png"
    elif image_format == "jpeg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
        kind = "image/jpeg"
    else:
        raise ValueError(f"image_format must be png or jpeg, got {image_format!r}")
    if not ok:
        raise ValueError("frame could not be encoded")
    return buf.tobytes(), kind


class ServeClient:
    """`ServeClient(url, token).create("Walk to the red ball.")` -> a RemoteSession; safe to share across threads."""

    def __init__(self, url: str, token: str, timeout: float = 120.0, max_connections: int = 64):
        self.http = httpx.Client(base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {token}"},
                                 timeout=timeout, limits=httpx.Limits(max_connections=max_connections))

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        r = self.http.request(method, path, **kwargs)
        if r.status_code >= 400:
            try:
                body = r.json()
                kind, detail = body.get("error", "error"), body.get("detail", r.text)
            except ValueError:
                kind, detail = "error", r.text
            raise ServeClientError(r.status_code, kind, detail)
        return r

    def create(self, instruction: str, **options) -> RemoteSession:
        """Options: episode, chunk, temperature, sample_seed, reference_memory_text (see the OpenAPI schema)."""
        sid = self.request("POST", "/v1/sessions", json={"instruction": instruction, **options}).json()["session"]
        return RemoteSession(self, sid)

    def health(self) -> dict:
        return self.request("GET", "/healthz").json()

    def metrics(self) -> str:
        return self.request("GET", "/metrics").text

    def close(self) -> None:
        self.http.close()


class RemoteSession:
    def __init__(self, client: ServeClient, sid: str):
        self.client, self.id = client, sid

    def step(self, frame, image_format: str = "png") -> dict:
        """One frame (an RGB array, or JPEG/PNG bytes) -> {"action", "actions", "stop", "decided", "step", ...}."""
        if isinstance(frame, (bytes, bytearray)):
            data, kind = bytes(frame), "image/png" if frame[:4] == b"\x89PNG" else "image/jpeg"
        else:
            data, kind = encode_frame(frame, image_format)
        return self.client.request("POST", f"/v1/sessions/{self.id}/step", content=data,
                                   headers={"Content-Type": kind}).json()

    def reset(self, instruction: str | None = None) -> dict:
        return self.client.request("POST", f"/v1/sessions/{self.id}/reset", json={"instruction": instruction}).json()

    def view(self) -> dict:
        return self.client.request("GET", f"/v1/sessions/{self.id}").json()

    def close(self) -> None:
        self.client.request("DELETE", f"/v1/sessions/{self.id}")


class HttpPolicy:
    """The rollout's policy interface with the decisions made by a server: a session per episode (keyed like
    the in-process AgentPolicy, so the same checkpoint gives the same actions), every environment's frame
    posted at once from its own thread, so the server can decide them in one batch. With `chunk`, sessions
    use the reference robot's protocol: a frame is posted only when the last answer's chunk has been played
    out, blind, as the reference's Go2 client does."""

    def __init__(self, client: ServeClient, num_envs: int, image_format: str = "png", chunk: bool = False):
        self.client, self.image_format, self.chunk = client, image_format, chunk
        self.pool = ThreadPoolExecutor(max_workers=num_envs)
        self.sessions: dict[int, RemoteSession] = {}
        self.queues: dict[int, list[int]] = {}  # actions answered and not yet executed
        self.latencies: list[float] = []  # seconds per step request, as the client saw it

    def reset(self, i, episode):
        if i in self.sessions:
            self.sessions.pop(i).close()
        self.sessions[i] = self.client.create(episode.instruction_text,
                                              episode=f"{episode.scene_id}|{episode.episode_id}", chunk=self.chunk)
        self.queues[i] = []

    def act(self, observations, active):
        futures = {i: self.pool.submit(self._timed, i, o.rgb)
                   for i, o in zip(active, observations) if not self.queues[i]}
        for i, f in futures.items():
            answer = f.result()
            self.queues[i] = list(answer["actions"]) if self.chunk else [answer["action"]]
        return {i: self.queues[i].pop(0) for i in active}

    def _timed(self, i, rgb):
        t0 = time.perf_counter()
        out = self.sessions[i].step(rgb, self.image_format)
        self.latencies.append(time.perf_counter() - t0)
        return out

    def episode_info(self, i) -> dict:
        """Called once when environment i's episode ends: its session closes."""
        s = self.sessions.pop(i)
        self.queues.pop(i, None)
        decisions = s.view()["decisions"]
        s.close()
        return {"decisions": decisions}

    def close(self) -> None:
        for s in self.sessions.values():
            s.close()
        self.sessions.clear()
        self.pool.shutdown()
