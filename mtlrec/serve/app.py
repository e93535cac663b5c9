"""HTTP scoring service: ``POST /score``, ``GET /health``, ``GET /metadata`` (FastAPI + uvicorn).

``POST /score`` takes ``{"candidates": [{field: raw value, ...}, ...], "weights": {task: w}?}``.
The saved encoder turns the candidates into tensors server-side (exactly as in training: unseen
categories go to the out-of-vocabulary bucket), the model predicts every task, and the configured
fusion (:mod:`mtlrec.serve.fusion`) turns the predictions into one score per candidate. The
field policy (no field required by default, unknown fields rejected, type checks) is described in
:mod:`mtlrec.serve.candidates`.

A client's mistake is a 4xx answer whose ``detail`` names the candidate index and the field
(``candidates[3].age: 'abc' is not a number``) and whose ``errors`` lists each problem; 413 for a
body over ``serve.max_body_bytes``. It is never a 500, and it never stops the server: the only
500 is a bug, answered with a generic message and logged with its traceback.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

import mtlrec
from mtlrec.errors import MTLRecError
from mtlrec.serve.candidates import Problem, RequestError, build_frame, field_specs
from mtlrec.serve.config import ServeConfig, load_serve_config
from mtlrec.serve.fusion import Fusion, WeightError
from mtlrec.serve.predictor import Predictor, load_predictor

log = logging.getLogger(__name__)


# --- request / response models -------------------------------------------------------------------
class ScoreRequest(BaseModel):
    """Candidates to score; ``weights`` optionally overrides fusion weights within their bounds."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    candidates: list[dict[str, Any]] = Field(
        description="One object per candidate: raw field name -> value (see GET /metadata)"
    )
    weights: dict[str, float] | None = Field(
        default=None, description="Per-task fusion weight overrides (weighted_sum/product only)"
    )


class CandidateScore(BaseModel):
    score: float | None = Field(description="Fused score; null if not finite (e.g. log(0))")
    probabilities: dict[str, float] = Field(
        description="Per task: P(task | upstream task) for binary tasks, the value for regression"
    )
    joint: dict[str, float] | None = Field(
        default=None, description="Per task: P(task and its upstream chain); funnel schemas only"
    )


class ScoreResponse(BaseModel):
    model: str
    tasks: list[str]
    fusion: str = Field(description="The formula used for this request")
    scores: list[CandidateScore]


class ErrorItem(BaseModel):
    loc: str
    candidate: int | None = None
    field: str | None = None
    message: str


class ErrorResponse(BaseModel):
    detail: str
    errors: list[ErrorItem] = []


# --- the service, independent of HTTP -----------------------------------------------------------
class ScoringService:
    """Encoder + model + fusion; ``score`` raises RequestError/WeightError for a bad request."""

    def __init__(self, predictor: Predictor, config: ServeConfig) -> None:
        self.predictor = predictor
        self.config = config
        self.schema = predictor.encoder.schema
        self.tasks = self.schema.task_names
        self.fusion = Fusion(config, self.tasks)
        self.specs = field_specs(self.schema)
        self.required = frozenset(config.required_fields)
        self.funnel = any(t.depends_on for t in self.schema.tasks)
        self.use_joint = config.probabilities == "joint"

    def score(
        self, candidates: list[dict[str, Any]], weights: dict[str, float] | None = None
    ) -> dict[str, Any]:
        if len(candidates) > self.config.max_candidates:
            raise RequestError(
                [
                    Problem(
                        f"{len(candidates)} candidates exceed the limit of "
                        f"{self.config.max_candidates} per request"
                    )
                ]
            )
        w = self.fusion.weights(weights)
        result: dict[str, Any] = {
            "model": self.predictor.model_name,
            "tasks": self.tasks,
            "fusion": self.fusion.formula(w),
            "scores": [],
        }
        if not candidates:
            return result
        frame = build_frame(candidates, self.specs, self.required)
        try:
            table = self.predictor.encoder.transform(frame, where="request", labels=False)
        except MTLRecError as exc:  # the checks above should make this unreachable
            raise RequestError([Problem(str(exc))]) from exc
        cond, joint = self.predictor.predict(table)
        fused = self.fusion(joint if self.use_joint else cond, w)
        tasks = self.tasks
        cond_rows = cond.astype(np.float64).tolist()
        joint_rows = joint.astype(np.float64).tolist() if self.funnel else None
        scores = []
        for i, s in enumerate(fused.tolist()):
            item: dict[str, Any] = {
                "score": s if math.isfinite(s) else None,
                "probabilities": dict(zip(tasks, cond_rows[i])),
            }
            if joint_rows is not None:
                item["joint"] = dict(zip(tasks, joint_rows[i]))
            scores.append(item)
        result["scores"] = scores
        return result

    def metadata(self) -> dict[str, Any]:
        cfg = self.config
        fusion: dict[str, Any] = {
            "kind": cfg.kind,
            "formula": self.fusion.formula(),
            "probabilities": cfg.probabilities,
        }
        if cfg.kind != "expression":
            fusion["weights"] = cfg.weights
            fusion["weight_bounds"] = {t: list(b) for t, b in cfg.weight_bounds.items()}
        return {
            "model": self.predictor.model_name,
            "source": self.predictor.source,
            "mtlrec_version": mtlrec.__version__,
            "tasks": [
                {"name": t.name, "type": t.type, "depends_on": t.depends_on}
                for t in self.schema.tasks
            ],
            "fields": [
                {"name": s.name, "kind": s.kind, "required": s.name in self.required}
                for s in self.specs
            ],
            "field_policy": (
                "unknown fields are rejected; fields not listed as required may be absent or "
                "null mean an empty training cell: numeric -> training mean, categorical -> "
                "the empty string's embedding (out-of-vocabulary if training had too few), "
                "sequence -> empty"
            ),
            "fusion": fusion,
            "max_candidates": cfg.max_candidates,
            "max_body_bytes": cfg.max_body_bytes,
            "schema": self.schema.to_dict(),
        }


# --- HTTP ------------------------------------------------------------------------------------------
def create_app(
    model_path: str | Path,
    fusion_file: str | Path | None = None,
    threads: int | None = None,
):
    """The FastAPI app for a run directory or an export folder.

    The fusion config comes from ``fusion_file``, else the export folder's ``fusion.yaml``, else
    the defaults. ``threads`` sets torch's (and onnxruntime's) intra-op threads: scoring a
    hundred candidates is too small to gain from several threads, and the HTTP server already
    runs requests concurrently.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if threads:
        import torch

        torch.set_num_threads(threads)
    predictor = load_predictor(model_path)
    config = load_serve_config(fusion_file or predictor.fusion_file, predictor.encoder.schema)
    service = ScoringService(predictor, config)

    app = FastAPI(
        title="mtlrec scoring service",
        version=mtlrec.__version__,
        description=__doc__,
    )
    app.state.service = service
    errors = {422: {"model": ErrorResponse}, 413: {"model": ErrorResponse}}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "model": predictor.model_name}

    @app.get("/metadata")
    def metadata() -> dict[str, Any]:
        return service.metadata()

    @app.post("/score", response_model=ScoreResponse, responses=errors)
    def score(request: ScoreRequest) -> dict[str, Any]:
        return service.score(request.candidates, request.weights)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        return _error(422, [_item(p) for p in exc.problems])

    @app.exception_handler(WeightError)
    async def weight_error(_: Request, exc: WeightError) -> JSONResponse:
        return _error(422, [{"loc": exc.field, "field": exc.field, "message": exc.reason}])

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, [_pydantic_item(e) for e in exc.errors()][:20])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own 400 for a body its JSON reader refuses (invalid UTF-8 inside a string,
        # nesting too deep, an integer of thousands of digits): the same shape as every error
        return _error(exc.status_code, [{"loc": "body", "message": str(exc.detail)}])

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error while serving a request", exc_info=exc)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    return app


def _error(status: int, items: list[dict[str, Any]]):
    from fastapi.responses import JSONResponse

    first = items[0] if items else {"loc": "body", "message": "invalid request"}
    detail = f"{first['loc']}: {first['message']}" if first["loc"] else first["message"]
    if len(items) > 1:
        detail += f" (and {len(items) - 1} more)"
    return JSONResponse({"detail": detail, "errors": items}, status_code=status)


def _item(p: Problem) -> dict[str, Any]:
    return {"loc": p.location, "candidate": p.index, "field": p.field, "message": p.message}


def _pydantic_item(err: dict[str, Any]) -> dict[str, Any]:
    """pydantic's ``("body", "candidates", 3, "x")`` -> ``candidates[3].x``."""
    if err.get("type") == "json_invalid":  # loc is ("body", character offset)
        at = err.get("loc", ("body", "?"))[-1]
        return {"loc": "body", "message": f"invalid JSON at character {at}"}
    loc = [p for p in err.get("loc", ()) if p != "body"]
    text, index, field = "", None, None
    for k, part in enumerate(loc):
        if isinstance(part, int):
            text += f"[{part}]"
            if k == 1 and loc[0] == "candidates":
                index = part
        else:
            text += f".{part}" if text else str(part)
            field = str(part) if k >= 1 else field
    if not text:
        text = "body"
    return {"loc": text, "candidate": index, "field": field, "message": str(err.get("msg"))}


class BodyLimit:
    """ASGI middleware: refuse a request body over ``limit`` bytes with 413 before anything parses
    it (a JSON body is otherwise read and decoded whole, whatever its size).

    An oversized body of up to ``DRAIN_FACTOR`` times the limit is read and thrown away (never
    held) before the 413 is sent, so an ordinary HTTP client, which writes its whole body before
    reading the answer, gets the 413 instead of a reset connection; anything larger is answered
    at once and the connection closed."""

    DRAIN_FACTOR = 4

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            drain = length.isdigit() and int(length) <= self.limit * self.DRAIN_FACTOR
            if drain and not await self._drain(receive, 0):
                return
            await self._too_large(send, close=not drain)
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            more = message.get("more_body", False)
            if total > self.limit:
                drained = not more or await self._drain(receive, total)
                await self._too_large(send, close=not drained)
                return
            chunks.append(chunk)
            if not more:
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _drain(self, receive, seen: int) -> bool:
        """Read the rest of the body and drop it; False if the client left or it is too big."""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return False
            seen += len(message.get("body", b""))
            if seen > self.limit * self.DRAIN_FACTOR:
                return False
            if not message.get("more_body", False):
                return True

    async def _too_large(self, send, close: bool) -> None:
        import json

        message = f"request body exceeds {self.limit} bytes"
        payload = json.dumps(
            {"detail": f"body: {message}", "errors": [{"loc": "body", "message": message}]}
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
        ]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def serve(
    model_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    fusion_file: str | Path | None = None,
    threads: int | None = 1,
    log_level: str = "info",
) -> None:
    """Load, then serve until interrupted (uvicorn, one process)."""
    try:
        import uvicorn
    except ImportError as exc:
        raise MTLRecError("serving needs the extras: pip install 'mtlrec[serve]'") from exc
    app = create_app(model_path, fusion_file, threads)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
