"""ServeConfig: every setting of the service, typed, loaded strictly from YAML (configs/serve/)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from pipeline.config import ConfigError


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise; put a TLS proxy in front for remote robots
    port: int = 8000
    max_sessions: int = 16  # agent slots; a create past it gets 429
    idle_timeout_s: float = 300.0  # a session with no request for this long is closed (410 afterwards)
    batch_wait_ms: float = 2.0  # how long the first waiting step waits for the other live sessions' steps
    max_batch: int = 0  # sessions per model call (0: no limit; 1: serial sessions, the benchmark's baseline)
    max_upload_bytes: int = 4_000_000  # a larger request body gets 413
    min_image_side: int = 16  # a frame's width and height must lie in [min, max] (422 otherwise)
    max_image_side: int = 4096
    max_instruction_chars: int = 2000  # a longer instruction gets 422
    reference_route: bool = False  # serve the reference's POST /eval_vln (needs `instruction`)
    instruction: str | None = None  # the reference route's instruction (the reference hard-codes one)
    session_log: str | None = None  # folder for per-session logs (frames and actions); off when null
    # the agent (null: the checkpoint's and the agent's defaults)
    num_frames: int | None = None
    num_history: int | None = None
    reference_memory_text: bool | None = None
    max_new_tokens: int | None = None  # tokens an answer may have (the agent's default: 24)
    seed: int = 0

    def validate(self) -> None:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            if self.host != "localhost":
                raise ConfigError(f"host: {self.host!r} is not an IP address (or localhost)") from None
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: {self.port} is not a TCP port")
        for name in ("max_sessions", "max_upload_bytes", "min_image_side", "max_image_side",
                     "max_instruction_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("num_frames", "max_new_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (or null), got {getattr(self, name)}")
        if self.min_image_side > self.max_image_side:
            raise ConfigError(f"min_image_side {self.min_image_side} > max_image_side {self.max_image_side}")
        if self.idle_timeout_s <= 0 or self.batch_wait_ms < 0 or self.max_batch < 0:
            raise ConfigError("idle_timeout_s must be > 0, batch_wait_ms and max_batch >= 0")
        if self.reference_route and not (self.instruction or "").strip():
            raise ConfigError("reference_route needs `instruction` (the route's clients send none)")
        if self.instruction is not None and not self.reference_route:
            raise ConfigError("instruction is used only by the reference route: set reference_route too")

    def is_loopback(self) -> bool:
        return self.host == "localhost" or ipaddress.ip_address(self.host).is_loopback
