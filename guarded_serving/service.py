"""BentoML adapter: decode HTTP, call the server core, encode the reply.

Routes: ``POST /predict``, ``POST /feedback`` (BentoML APIs), ``GET /fairness`` and
``GET /models`` (a small Starlette app mounted beside them, as BentoML APIs are
POST-only), and BentoML's own ``/livez``, ``/readyz`` and ``/metrics``. Start with
``bentoml serve guarded_serving.service:GuardedService``.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from http import HTTPStatus
from typing import Annotated, Any

import bentoml
import numpy as np
from pydantic import Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guarded_serving.errors import InvalidInput, InvalidInputs, Unauthenticated
from guarded_serving.server import GuardedServer, Reply
from guarded_serving.settings import GuardedServingSettings
from guarded_serving.telemetry import install_json_logging

logger = logging.getLogger(__name__)

_state: dict[str, GuardedServer] = {}


def _api_key(headers: Any) -> str | None:
    """The presented API key: ``Authorization: Bearer`` first, then ``X-API-Key``.

    Raises:
        Unauthenticated: An ``Authorization`` header of another scheme.
    """
    auth = headers.get("authorization")
    if auth:
        scheme, _, key = auth.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthenticated("use 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        return key.strip() or None
    return headers.get("x-api-key") or None


def _unexpected(scope: Scope) -> InvalidInputs | None:
    """Top-level body fields the endpoint does not take, as found by :class:`RequestGate`."""
    names = scope.get(_UNEXPECTED_KEY) or []
    if not names:
        return None
    return InvalidInputs(
        [InvalidInput(name if _PLAIN_NAME.fullmatch(name) else "(body)",
                      "unexpected_field", "not a field of this endpoint")
         for name in names[:50]]
    )  # fmt: skip


def _explain_deadline(scope: Scope) -> float | None:
    """When explaining must stop: early enough after arrival that the answer beats the
    request timeout, however long the request waited for a worker thread."""
    arrived = scope.get(ARRIVED_KEY)
    return None if arrived is None else arrived + EXPLAIN_WITHIN_S


def _response(reply: Reply, ctx: bentoml.Context | None = None) -> JSONResponse:
    if ctx is not None:
        # BentoML copies the context's status onto whatever the API returns.
        ctx.response.status_code = reply.status
    return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)


def _server() -> GuardedServer:
    return _state["server"]


def _call(method: Any, headers: Any, **kwargs: Any) -> Reply:
    """Run a server-core method with the request's API key."""
    try:
        api_key = _api_key(headers)
    except Unauthenticated as exc:
        return Reply.error(exc, uuid.uuid4().hex)
    return method(api_key, **kwargs)


async def _fairness(request: Request) -> JSONResponse:
    model = request.query_params.get("model")
    reply = await _run_sync(_call, _server().fairness, request.headers, model=model)
    return _response(reply)


async def _models(request: Request) -> JSONResponse:
    reply = await _run_sync(_call, _server().models, request.headers)
    return _response(reply)


async def _run_sync(func: Any, *args: Any, **kwargs: Any) -> Any:
    import anyio.to_thread

    return await anyio.to_thread.run_sync(lambda: func(*args, **kwargs))


read_app = Starlette(
    routes=[
        Route("/fairness", _fairness, methods=["GET"]),
        Route("/models", _models, methods=["GET"]),
    ]
)


# Bodies above this are refused before parsing (413); a full batch is far smaller.
MAX_BODY_BYTES = 2 * 1024 * 1024
# JSON nested deeper than this is refused (400): a tensor record of rank 4 in a
# batch sits at depth 6, and BentoML's own parser stops at 200.
MAX_JSON_DEPTH = 32
# Numbers longer than this are refused (400): no float needs them, and BentoML's
# parser gives up on some that Python's reads.
MAX_NUMBER_CHARS = 64
_LONG_NUMBER = re.compile(rb"[-+0-9.eE]{%d,}" % (MAX_NUMBER_CHARS + 1))
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"')
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# +1 for each byte that opens an array or object, -1 for each that closes one.
_BRACKET_STEP = np.zeros(256, dtype=np.int8)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1
# BentoML answers 504 past this. Explanations stop EXPLAIN_WITHIN_S after a request
# arrives, leaving the rest for predicting, encoding and the queue behind it.
REQUEST_TIMEOUT_S = 30
EXPLAIN_WITHIN_S = 20.0
# Sync API calls run on this many threads, so that quick requests are not held up
# behind one that spends its explanation budget.
API_THREADS = 4
ARRIVED_KEY = "guarded_serving.arrived_s"
"""Where the gate notes, in the request scope, when the request arrived (monotonic)."""
# The top-level fields each API takes; others are refused with 422 after identify.
_API_FIELDS = {
    "/predict": frozenset({"records", "context", "model", "version", "explain"}),
    "/feedback": frozenset({"labels", "model"}),
}
_UNEXPECTED_KEY = "guarded_serving.unexpected_fields"
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_STATUS_CODES = {400: "malformed_body", 404: "not_found", 405: "method_not_allowed",
                 413: "body_too_large", 415: "unsupported_media_type", 500: "internal_error",
                 503: "unavailable", 504: "timeout"}  # fmt: skip


class RequestGate:
    """Checks API bodies before BentoML parses them, and gives every error our shape.

    For ``POST /predict`` and ``/feedback`` the body must be JSON (415 otherwise), at
    most ``MAX_BODY_BYTES`` (413, refused on its declared length before it is read),
    and a JSON object in UTF-8 without a byte-order mark, nested at most
    ``MAX_JSON_DEPTH`` deep, with no number over ``MAX_NUMBER_CHARS`` characters and
    no unpaired surrogate escapes (400): what BentoML's own parser then reads the same
    way. A body that passes is handed on unchanged. Any error answer that did not come
    from the server core (BentoML's own 404, 405, 500 and the like) is rewritten into
    the ``{"error", "code", "request_id"}`` envelope, with no exception text, and a
    redirect (the router's, for a path with a trailing slash, to the client's own
    ``Host``) becomes a 404. The gate also notes when each request arrived
    (``ARRIVED_KEY``), so that explanations can stop in time.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[ARRIVED_KEY] = time.monotonic()
        allowed = _API_FIELDS.get(scope["path"])
        if scope["method"] == "POST" and allowed is not None:
            body, parsed, problem = await _read_body(scope, receive)
            if problem is not None:
                await _send_error(send, *problem)
                return
            scope[_UNEXPECTED_KEY] = [name for name in parsed if name not in allowed]
            receive = _replay(body)
        await self.app(scope, receive, _enveloping(send))


async def _read_body(
    scope: Scope, receive: Receive
) -> tuple[bytes, dict[str, Any], tuple[int, str] | None]:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    media_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        return b"", {}, (415, "the body must be application/json")
    if headers.get("content-encoding", "").strip().lower() not in ("", "identity"):
        return b"", {}, (415, "compressed bodies are not accepted")
    declared = headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return b"", {}, (413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", {}, (400, "the request ended early")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return b"", {}, (413, f"the body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    problem = _text_problem(body)
    if problem is not None:
        return body, {}, (400, problem)
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return body, {}, (400, "the body is not valid JSON")
    if not isinstance(parsed, dict):
        return body, {}, (400, "the body must be a JSON object")
    if _SURROGATE_ESCAPE.search(body):
        try:
            json.dumps(parsed, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return body, {}, (400, "the body holds an unpaired surrogate escape")
    return body, parsed, None


def _text_problem(body: bytes) -> str | None:
    """Why a body cannot be JSON that BentoML's own parser reads as we do, or ``None``.

    Checked on the raw bytes at C speed (milliseconds for a full body, on the event
    loop): strict UTF-8 without a byte-order mark, the nesting depth counted from the
    brackets outside strings, and the length of every number.
    """
    if not body.strip():
        return "the body is empty; expected a JSON object"
    if body.startswith(b"\xef\xbb\xbf"):
        return "the body starts with a byte-order mark; send plain UTF-8"
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return "the body is not UTF-8"
    outside_strings = _JSON_STRING.sub(b'""', body)
    steps = _BRACKET_STEP[np.frombuffer(outside_strings, dtype=np.uint8)]
    if int(np.cumsum(steps, dtype=np.int32).max()) > MAX_JSON_DEPTH:
        return f"the body is nested deeper than {MAX_JSON_DEPTH} levels"
    if _LONG_NUMBER.search(outside_strings):
        return f"a number in the body is longer than {MAX_NUMBER_CHARS} characters"
    return None


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _send_error(send: Send, status: int, message: str) -> None:
    request_id = uuid.uuid4().hex
    code = _STATUS_CODES.get(status, "error" if status < 500 else "internal_error")
    body = json.dumps({"error": message, "code": code, "request_id": request_id}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-request-id", request_id.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _enveloping(send: Send) -> Send:
    """Rewrite error answers that lack our request id into the standard envelope."""
    rewriting = False

    async def wrapped(message: Message) -> None:
        nonlocal rewriting
        if message["type"] == "http.response.start":
            status = message["status"]
            ours = any(k.lower() == b"x-request-id" for k, _ in message.get("headers", []))
            if 300 <= status < 400 and not ours:
                # The router redirects '/livez/' to '/livez' on the client's own Host
                # header; no route of ours redirects, so such a path is simply not found.
                status = 404
            if status >= 400 and not ours:
                rewriting = True
                reason = HTTPStatus(status).phrase.lower() if status in _KNOWN else "error"
                await _send_error(send, status, reason)
                return
        if rewriting:
            return
        await send(message)

    return wrapped


_KNOWN = {s.value for s in HTTPStatus}


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
@bentoml.service(
    name="guarded_serving", workers=1, threads=API_THREADS, traffic={"timeout": REQUEST_TIMEOUT_S}
)
class GuardedService:
    """Guarded, explained, fairness-monitored model serving."""

    def __init__(self) -> None:
        install_json_logging()
        self.server = GuardedServer(GuardedServingSettings())
        _state["server"] = self.server

    def __is_ready__(self) -> bool:
        return self.server.ready

    @bentoml.api(route="/predict")
    def predict(
        self,
        ctx: bentoml.Context,
        records: Records = None,
        context: Context = None,
        model: Annotated[Any, Field(description="Model name; optional with one model.")] = None,
        version: Annotated[Any, Field(description="Pin a model version.")] = None,
        explain: Annotated[Any, Field(description="Attach attributions.")] = True,
    ) -> dict[str, Any]:  # a JSONResponse, passed through by BentoML
        """Score rows through the guards; answer with labels, guard verdicts and SHAP."""
        reply = _call(
            self.server.predict,
            ctx.request.headers,
            model=model,
            version=version,
            records=records,
            context=context,
            explain=explain,
            unexpected=_unexpected(ctx.request.scope),
            deadline_s=_explain_deadline(ctx.request.scope),
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
        reply = _call(
            self.server.feedback,
            ctx.request.headers,
            model=model,
            labels=labels,
            unexpected=_unexpected(ctx.request.scope),
        )
        return _response(reply, ctx)

    @bentoml.on_shutdown
    def _close(self) -> None:
        self.server.close()


GuardedService.add_asgi_middleware(RequestGate)
