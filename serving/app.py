"""The serving reference and the ops freshness dashboard (FastAPI).

    GET /recall/{user_id}?k=10     top-k items for a user (cold-start users get an answer too)
    GET /freshness                 jobs.status.status_json + a derived ``freshness`` section
    GET /freshness/history?hours=  per-hour incremental counters and freshness samples (charts)
    GET /metrics                   Prometheus text (serving.metrics)
    GET /                          the ops dashboard (one self-contained HTML page)
    GET /healthz, /readyz          liveness; readiness (200 only once a version is loaded)

``make serve`` runs ``serve(settings)``: uvicorn on ``serving.host:serving.port`` (localhost by
default). One background thread follows the version pointer (serving.engine) and appends a
freshness sample to Redis every ``serving.sample_interval_s``, so the dashboard's history keeps
growing without anyone watching it and survives restarts.

Validation: ``k`` in 1..``serving.max_k``; ``user_id`` non-empty, at most
``serving.max_user_id_len`` characters, no control characters or surrounding blanks (the rule
the stream consumer applies to ids, so every id it accepts can be served). A bad request gets
HTTP 422 with ``{"detail": ...}``; nothing published yet or Redis unreachable gets 503.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import redis
from fastapi import FastAPI, HTTPException, Path as PathParam, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from serving import freshness as fr
from serving.engine import NotReady, VersionFollower
from serving.metrics import ServingMetrics
from serving.recall import user_id_problem
from twotower.config import Settings

log = logging.getLogger(__name__)

DASHBOARD_HTML = Path(__file__).resolve().parent / "static" / "dashboard.html"
MAX_HISTORY_HOURS = 7 * 24


class RecallMetricsMiddleware:
    """Counts every /recall answer by status code and times it, validation failures included."""

    def __init__(self, app: Any, metrics: ServingMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/recall/"):
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        code = 500

        async def send_status(message: dict) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe(code, time.perf_counter() - t0)


def serving_redis(settings: Settings) -> redis.Redis:
    """The server's Redis client: the project's client with the request path's short timeouts."""
    from jobs.redis_conn import redis_client

    cfg = settings.serving
    return redis_client(settings.replace("redis", socket_timeout_s=cfg.redis_timeout_s, retries=cfg.redis_retries), ping=False)


def create_app(settings: Settings, client: redis.Redis | None = None) -> FastAPI:
    """The API and dashboard for one deployment (``settings.redis.prefix``).

    ``client``: a Redis client to use (tests); by default one is made from the settings.
    The background thread starts and stops with the app's lifespan.
    """
    cfg = settings.serving
    client = client or serving_redis(settings)
    prefix = settings.redis.prefix
    follower: VersionFollower

    def current_freshness() -> dict[str, Any]:
        raw = fr.gather(settings, client)
        loaded = follower.state().loaded_version
        return {"raw": raw, "fresh": fr.derive(raw, int(time.time() * 1000), cfg, loaded)}

    metrics = ServingMetrics(lambda: current_freshness()["fresh"])
    follower = VersionFollower(settings, client, on_switch=lambda old, new: metrics.switches.inc())
    stop = threading.Event()

    def background() -> None:
        next_sample = 0.0
        while not stop.is_set():
            try:
                follower.check_pointer()
                if time.monotonic() >= next_sample:
                    fr.record_sample(client, prefix, current_freshness()["fresh"], cfg)
                    next_sample = time.monotonic() + cfg.sample_interval_s
            except Exception as exc:  # noqa: BLE001 - the loop must outlive a Redis hiccup
                log.warning("serving: background check failed (%s: %s); retrying", type(exc).__name__, exc)
            stop.wait(cfg.pointer_check_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            follower.check_pointer()  # serve from the first request when a version exists
        except redis.RedisError as exc:
            log.error("serving: Redis at start-up: %s; /recall answers 503 until it is reachable", exc)
        thread = threading.Thread(target=background, name="serving-pointer-follower", daemon=True)
        thread.start()
        log.info("serving: ready (prefix %r, version %s)", prefix, follower.state().loaded_version or "none yet")
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=10)

    app = FastAPI(title="Two-tower recall", version="1", lifespan=lifespan)
    app.state.follower = follower
    app.state.metrics = metrics
    app.add_middleware(RecallMetricsMiddleware, metrics=metrics)

    @app.exception_handler(redis.RedisError)
    async def redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        log.error("serving: Redis error on %s: %s", request.url.path, exc)
        return JSONResponse({"detail": f"Redis is unavailable: {type(exc).__name__}"}, status_code=503)

    @app.get("/recall/{user_id}")
    def recall_endpoint(
        user_id: str = PathParam(..., description="user id as the events carry it"),
        k: int = Query(cfg.default_k, ge=1, le=cfg.max_k, description=f"candidates to return, 1..{cfg.max_k}"),
    ) -> dict[str, Any]:
        problem = user_id_problem(user_id, cfg)
        if problem:
            raise HTTPException(status_code=422, detail=problem)
        t0 = time.perf_counter()
        try:
            result = follower.recall(user_id, k)
        except NotReady as exc:
            raise HTTPException(status_code=503, detail=str(exc)) from None
        if not result.known_user:
            metrics.cold_start.inc()
        return {
            "user_id": user_id,
            "version": result.version,
            "k": k,
            "cold_start": not result.known_user,
            "history_used": result.history_used,
            "items": [{"item_id": item, "score": round(score, 6)} for item, score in result.items],
            "took_ms": round((time.perf_counter() - t0) * 1000, 3),
        }

    @app.get("/freshness")
    def freshness_endpoint() -> dict[str, Any]:
        now = current_freshness()
        fr.record_sample(client, prefix, now["fresh"], cfg)
        return {**now["raw"]["status"], "freshness": now["fresh"]}

    @app.get("/freshness/history")
    def history_endpoint(hours: int = Query(cfg.history_hours, ge=1, le=MAX_HISTORY_HOURS)) -> dict[str, Any]:
        fresh = current_freshness()["fresh"]
        return fr.history(client, prefix, fresh, settings.replace("serving", history_hours=hours).serving)

    @app.get("/metrics")
    def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    def dashboard() -> HTMLResponse:
        return HTMLResponse(DASHBOARD_HTML.read_text(encoding="utf-8"))

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        state = follower.state()
        return {"status": "ok", "loaded_version": state.loaded_version, "pointer_version": state.pointer_version}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        state = follower.state()
        ready = state.loaded_version is not None
        body = {"ready": ready, "loaded_version": state.loaded_version, "error": state.last_error}
        return JSONResponse(body, status_code=200 if ready else 503)

    return app


def serve(settings: Settings) -> int:
    """Run the API and dashboard with uvicorn until interrupted (``make serve``)."""
    import faiss
    import torch
    import uvicorn

    cfg = settings.serving
    torch.set_num_threads(max(1, cfg.compute_threads))
    faiss.omp_set_num_threads(max(1, cfg.compute_threads))
    log.info("serving: dashboard and API on http://%s:%d/ (Redis prefix %r)", cfg.host, cfg.port, settings.redis.prefix)
    uvicorn.run(create_app(settings), host=cfg.host, port=cfg.port, log_level="info", access_log=False)
    return 0


if __name__ == "__main__":
    from twotower.config import load_settings
    from twotower.logs import setup_logging

    setup_logging()
    raise SystemExit(serve(load_settings()))
