"""The HTTP surface (FastAPI on uvicorn): the routes, the token and body-size guard, errors as JSON with a status."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from .engine import Engine
from .inputs import InputError, decode_frame

OPEN_PATHS = {"/healthz"}  # liveness probes carry no token; they learn nothing but "ok"


class CreateSession(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instruction: str = Field(description="what the robot should do, in words")
    episode: str | None = Field(None, max_length=256, description="key of the agent's per-episode draws "
                                "(conjunctions); null: the instruction. Same key, same frames: same actions")
    chunk: bool = Field(False, description="each step is a decision and answers the whole action chunk "
                        "(the reference's protocol); default: one action per frame, the streaming agent's own")
    temperature: float | None = Field(None, description="sample the answers at this temperature (null: greedy)")
    sample_seed: int = Field(0, description="seed of the sampling generator")
    reference_memory_text: bool | None = Field(None, description="the reference eval's memory sentence "
                                                "(null: the server's setting)")


class ResetSession(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instruction: str | None = Field(None, description="a new instruction (null: keep the current one)")


def _error(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": message}, status_code=status, headers=headers)


class Guard:
    """Pure ASGI middleware: the token is checked before anything is read, then the body is read up to the limit
    (413 past it; a client that disconnects mid-upload causes no work) and replayed to the app."""

    def __init__(self, app, token: str, max_bytes: int, metrics, reference_query_token: bool):
        self.app, self.token, self.max_bytes, self.metrics = app, token.encode(), max_bytes, metrics
        self.reference_query_token = reference_query_token

    def _authorised(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
        if not given and self.reference_query_token and scope["path"] == "/eval_vln":
            # the reference's robot client sends no header: its URL can carry the token (see docs/serve.md)
            given = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token") or [""])[0].encode()
        return bool(given) and hmac.compare_digest(given, self.token)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if not self._authorised(scope):
            self.metrics.inc("streamvln_errors_total", kind="unauthorized")
            return await _error(401, "unauthorized", "a valid bearer token is required (Authorization: Bearer ...)",
                                {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            declared = int(length) if length is not None else 0
        except ValueError:
            self.metrics.inc("streamvln_errors_total", kind="bad_request")
            return await _error(400, "bad_request", "malformed Content-Length")(scope, receive, send)
        if declared > self.max_bytes:
            return await self._too_large(declared, scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.metrics.inc("streamvln_errors_total", kind="disconnected")
                return  # nobody to answer: nothing was done
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._too_large(len(body), scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, size, scope, receive, send):
        self.metrics.inc("streamvln_errors_total", kind="too_large")
        return await _error(413, "too_large", f"request body of {size}+ bytes exceeds max_upload_bytes "
                                              f"{self.max_bytes}")(scope, receive, send)


def create_app(engine: Engine, token: str) -> FastAPI:
    cfg, metrics = engine.cfg, engine.metrics
    app = FastAPI(title="streamvln-serve", version="1", openapi_url=None, docs_url=None, redoc_url=None,
                  description="StreamVLN's streaming agent over HTTP: sessions of frames in, navigation actions out "
                              "(0 STOP, 1 forward 0.25 m, 2 turn left 15 deg, 3 turn right 15 deg).")
    app.add_middleware(Guard, token=token, max_bytes=cfg.max_upload_bytes, metrics=metrics,
                       reference_query_token=cfg.reference_route)
    app.state.engine = engine
    reference = {"session": None}

    @app.exception_handler(InputError)
    async def refused(request: Request, e: InputError):
        metrics.inc("streamvln_errors_total", kind=e.kind)
        headers = {"Retry-After": "5"} if e.status == 429 else None
        return _error(e.status, e.kind, str(e), headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        metrics.inc("streamvln_errors_total", kind="bad_request")
        detail = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        return _error(422, "bad_request", detail)

    async def frame_of(request: Request) -> tuple[bytes, dict]:
        """The frame as the raw body (Content-Type image/jpeg or image/png) or a multipart file field `image`;
        and the form's other fields."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return await request.body(), {}
        form = await request.form()
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise InputError(422, "bad_image", "multipart request without a file field `image`")
        return await upload.read(), {k: v for k, v in form.items() if isinstance(v, str)}

    async def step(sid: str, data: bytes, rgb=None) -> dict:
        t0 = time.perf_counter()
        if rgb is None:
            rgb = await asyncio.to_thread(decode_frame, data, cfg)
        answer = await asyncio.wrap_future(engine.submit(sid, rgb, data))
        metrics.observe("streamvln_step_latency_seconds", time.perf_counter() - t0)
        return answer

    @app.get("/healthz", summary="Liveness (no token needed)")
    def healthz():
        return {"status": "ok"}

    @app.get("/metrics", summary="Prometheus text format", response_class=PlainTextResponse)
    def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/openapi.json", include_in_schema=False)
    def openapi():
        return app.openapi()

    @app.post("/v1/sessions", status_code=201, summary="Open a session: a new episode with its instruction")
    def create(body: CreateSession):
        s = engine.create(body.instruction, body.episode, body.chunk, body.temperature, body.sample_seed,
                          body.reference_memory_text)
        return {"session": s.id, "idle_timeout_s": cfg.idle_timeout_s}

    @app.post("/v1/sessions/{sid}/step", summary="One frame (JPEG or PNG body, or multipart field `image`) -> actions",
              openapi_extra={"requestBody": {"content": {"image/jpeg": {}, "image/png": {}}, "required": True}})
    async def step_route(sid: str, request: Request):
        data, _ = await frame_of(request)
        return await step(sid, data)

    @app.post("/v1/sessions/{sid}/reset", summary="Start a new episode in the session (optionally a new instruction)")
    def reset(sid: str, body: ResetSession | None = None):
        s = engine.reset(sid, body.instruction if body else None)
        return {"session": s.id, "instruction": s.instruction}

    @app.get("/v1/sessions/{sid}", summary="The session's state and its last answer")
    def view(sid: str):
        return engine.view(sid)

    @app.delete("/v1/sessions/{sid}", status_code=204, summary="Close the session")
    def close(sid: str):
        engine.close(sid)
        return Response(status_code=204)

    if cfg.reference_route:
        @app.post("/eval_vln", summary="The reference robot client's route: form `image` + `json` {\"reset\": bool} "
                                       "-> {\"action\": [...]}")
        async def eval_vln(request: Request):
            data, form = await frame_of(request)
            try:
                options = json.loads(form.get("json") or "{}")
                do_reset = bool(options.get("reset", False)) if isinstance(options, dict) else None
            except ValueError:
                do_reset = None
            if do_reset is None:
                raise InputError(422, "bad_request", "form field `json` must be a JSON object like {\"reset\": true}")
            rgb = await asyncio.to_thread(decode_frame, data, cfg)  # a bad frame changes nothing
            sid = reference["session"]
            known = sid in engine.sessions
            if do_reset or not known:
                if known:
                    await asyncio.to_thread(engine.close, sid)
                s = await asyncio.to_thread(engine.create, cfg.instruction, "reference", True)
                reference["session"] = sid = s.id
            elif engine.sessions[sid].stopped:  # the reference answers STOP forever; here a new episode begins
                await asyncio.to_thread(engine.reset, sid)
            return {"action": (await step(sid, data, rgb))["actions"]}

    return app
