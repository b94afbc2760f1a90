"""BentoML adapter: decode HTTP, call the server core, encode the reply.

Routes: ``POST /predict``, ``POST /feedback`` (BentoML APIs), ``GET /fairness`` and
``GET /models`` (a small Starlette app mounted beside them, as BentoML APIs are
POST-only), and BentoML's own ``/livez``, ``/readyz`` and ``/metrics``. Start with
``bentoml serve guarded_serving.service:GuardedService``.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

import bentoml
from pydantic import Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guarded_serving.server import GuardedServer, Reply
from guarded_serving.settings import GuardedServingSettings
from guarded_serving.telemetry import install_json_logging

logger = logging.getLogger(__name__)

_state: dict[str, GuardedServer] = {}


def _api_key(headers: Any) -> str | None:
    auth = headers.get("authorization")
    if auth and auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return headers.get("x-api-key") or None


def _response(reply: Reply, ctx: bentoml.Context | None = None) -> JSONResponse:
    if ctx is not None:
        # BentoML copies the context's status onto whatever the API returns.
        ctx.response.status_code = reply.status
    return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)


def _server() -> GuardedServer:
    return _state["server"]


async def _fairness(request: Request) -> JSONResponse:
    model = request.query_params.get("model")
    reply = await _run_sync(_server().fairness, _api_key(request.headers), model=model)
    return _response(reply)


async def _models(request: Request) -> JSONResponse:
    statuses = _server().readiness()
    ready = all(s["ready"] for s in statuses)
    return JSONResponse({"ready": ready, "models": statuses}, status_code=200 if ready else 503)


async def _run_sync(func: Any, *args: Any, **kwargs: Any) -> Any:
    import anyio.to_thread

    return await anyio.to_thread.run_sync(lambda: func(*args, **kwargs))


read_app = Starlette(
    routes=[
        Route("/fairness", _fairness, methods=["GET"]),
        Route("/models", _models, methods=["GET"]),
    ]
)


class ErrorEnvelope:
    """Give BentoML's own 400 answers (body not JSON, not an object) our error shape."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rewriting = False

        async def send_wrapper(message: Message) -> None:
            nonlocal rewriting
            if message["type"] == "http.response.start" and message["status"] == 400:
                rewriting = True
                body = json.dumps(
                    {"error": "the body must be a JSON object", "code": "malformed_body"}
                ).encode()
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.lower() not in (b"content-length", b"content-type")
                ]
                headers += [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ]
                await send({**message, "headers": headers})
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
            if rewriting:
                return
            await send(message)

        await self.app(scope, receive, send_wrapper)


Records = Annotated[
    Any,
    Field(
        description="Rows to score: a list of objects, feature name to value, as the "
        "model's policy declares them.",
        json_schema_extra={"type": "array", "items": {"type": "object"}},
    ),
]
Context = Annotated[
    Any,
    Field(
        description="Optional, one object per record: protected attribute to group. "
        "Used for fairness accounting only, never as a model input.",
        json_schema_extra={"type": "array", "items": {"type": "object"}},
    ),
]


@bentoml.asgi_app(read_app, path="/")
@bentoml.service(name="guarded_serving", workers=1, traffic={"timeout": 30})
class GuardedService:
    """Guarded, explained, fairness-monitored model serving."""

    def __init__(self) -> None:
        install_json_logging()
        self.server = GuardedServer(GuardedServingSettings())
        _state["server"] = self.server

    def __is_ready__(self) -> bool:
        return self.server.registry.all_ready

    @bentoml.api(route="/predict")
    def predict(
        self,
        ctx: bentoml.Context,
        records: Records = None,
        context: Context = None,
        model: Annotated[Any, Field(description="Model name; optional with one model.")] = None,
        version: Annotated[Any, Field(description="Pin a model version.")] = None,
        explain: Annotated[Any, Field(description="Attach SHAP attributions.")] = True,
    ) -> dict[str, Any]:  # a JSONResponse, passed through by BentoML
        """Score rows through the guards; answer with labels, guard verdicts and SHAP."""
        reply = self.server.predict(
            _api_key(ctx.request.headers),
            model=model,
            version=version,
            records=records,
            context=context,
            explain=explain,
        )
        return _response(reply, ctx)

    @bentoml.api(route="/feedback")
    def feedback(
        self,
        ctx: bentoml.Context,
        labels: Annotated[
            Any,
            Field(
                description="True outcomes: a list of {id, label} with the record ids "
                "that /predict returned.",
                json_schema_extra={"type": "array", "items": {"type": "object"}},
            ),
        ] = None,
        model: Annotated[Any, Field(description="Model name; optional with one model.")] = None,
    ) -> dict[str, Any]:  # a JSONResponse, passed through by BentoML
        """Join true outcomes to earlier predictions for the fairness accumulator."""
        reply = self.server.feedback(_api_key(ctx.request.headers), model=model, labels=labels)
        return _response(reply, ctx)

    @bentoml.on_shutdown
    def _close(self) -> None:
        self.server.close()


GuardedService.add_asgi_middleware(ErrorEnvelope)
