"""Put it together: checkpoint -> agent -> engine -> app under uvicorn, in the foreground or in a background thread."""

from __future__ import annotations

import os
import secrets
import socket
import stat
import threading
from pathlib import Path

import uvicorn

from .app import create_app
from .config import ServeConfig
from .engine import Engine


class TokenError(ValueError):
    pass


def read_token(path: str | Path, create: bool = True) -> tuple[str, bool]:
    """The bearer token in `path` (created with a fresh random token, mode 0600, when missing); refuses a
    file other users can read and a token too short to be a secret. Returns (token, created)."""
    path = Path(path).expanduser()
    created = False
    if not path.exists():
        if not create:
            raise TokenError(f"{path}: no token file")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        created = True
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenError(f"{path}: readable by other users (mode {stat.filemode(mode)}): chmod 600 {path}")
    token = path.read_text().strip()
    if len(token) < 16 or any(c.isspace() for c in token):
        raise TokenError(f"{path}: the token must be one word of at least 16 characters")
    return token, created


def build_engine(checkpoint: str, cfg: ServeConfig) -> Engine:
    from streamvln.agent.streaming import load_agent
    agent = load_agent(checkpoint, cfg.max_sessions, cfg.seed,
                       {"num_frames": cfg.num_frames, "num_history": cfg.num_history,
                        "reference_memory_text": cfg.reference_memory_text, "max_new_tokens": cfg.max_new_tokens})
    return Engine(agent, cfg)


def uvicorn_config(app, cfg: ServeConfig) -> uvicorn.Config:
    # no access log: the reference route's URL may carry the token; errors are counted in /metrics instead
    return uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
                          timeout_keep_alive=30, limit_concurrency=max(64, 4 * cfg.max_sessions))


class BackgroundServer:
    """The real uvicorn server on a loopback socket, in a thread (tests and the benchmark); `url`, `stop()`."""

    def __init__(self, engine: Engine, token: str, port: int = 0):
        self.engine = engine
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", port))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(create_app(engine, token), engine.cfg))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread ended before it started")
            self.thread.join(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()
        self.engine.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
