"""The OpenAI-compatible endpoint (`/api/v1/openai`): chat completions and models, so any
OpenAI SDK or tool talks to a published APIX agent; `model` is the agent's slug.

A chat completion is one turn of an APIX session run by the agent: the request becomes a
run, the run's events become OpenAI's objects or chunks, and every error on these routes is
rendered in OpenAI's error shape. docs/openai-compatible.md describes the mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from apix.agents import service
from apix.agents.models import Agent, ChatMessage
from apix.agents.router import Runtime
from apix.agents.schemas import TERMINAL, RunCreate, RunRead, SessionCreate
from apix.agents.service import AgentsRuntime
from apix.audit.service import RequestMeta
from apix.core.errors import AppError, BadRequest, Forbidden
from apix.core.json import ORJSONResponse, dumps, loads
from apix.core.logging import get_logger
from apix.core.routing import DocumentedRoute
from apix.identity.deps import Meta, require
from apix.identity.principal import Principal
from apix.realtime import channels
from apix.realtime.gateway import Gateway
from apix.realtime.schemas import Position
from apix.realtime.sse import open_stream

__all__ = ["router"]

log = get_logger(__name__)

_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")  # as `AgentCreate.slug`
_MAX_INPUT = 200_000  # as `RunCreate.input`
_POLL_S = 0.2
_CANCEL_GRACE_S = 5.0
SESSION_HEADER = "X-APIX-Session-Id"
RUN_HEADER = "X-APIX-Run-Id"
INSTRUCTIONS = "instructions"  # the session variable holding the caller's system messages


# --- errors ---------------------------------------------------------------------------


class OpenAIError(Exception):
    """An error as OpenAI renders it: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status == 403:
            return "permission_error"
        if self.status == 429:
            return "rate_limit_error"
        if self.status == 503:
            return "service_unavailable_error"
        return "server_error" if self.status >= 500 else "invalid_request_error"

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> ORJSONResponse:
        return ORJSONResponse(self.body(), status_code=self.status, headers=self.headers)

    @classmethod
    def of(cls, exc: AppError) -> OpenAIError:
        param = exc.details.get("param") if isinstance(exc.details, dict) else None
        return cls(
            exc.status_code,
            exc.code,
            exc.message,
            param=param if isinstance(param, str) else None,
            headers=exc.headers,
        )


def model_not_found(slug: str, why: str = "does not exist") -> OpenAIError:
    return OpenAIError(
        404,
        "model_not_found",
        f"the model {slug!r} {why}: name a published agent's slug",
        param="model",
    )


def invalid(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, "invalid_request", message, param=param)


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class OpenAIErrorResponse(BaseModel):
    """The body of every error on `/api/v1/openai` (OpenAI's shape)."""

    error: OpenAIErrorBody


_HTTP_CODES = {413: "too_large", 415: "unsupported_media_type"}


class _OpenAIRoute(DocumentedRoute):
    """Renders the errors of the route, its dependencies and its body in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def openai_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except OpenAIError as exc:
                return exc.response()
            except AppError as exc:
                return OpenAIError.of(exc).response()
            except RequestValidationError as exc:
                return _validation_error(exc).response()
            except StarletteHTTPException as exc:  # a body over the size limit, say
                message = exc.detail if isinstance(exc.detail, str) else "request refused"
                code = _HTTP_CODES.get(exc.status_code, "http_error")
                headers = dict(exc.headers) if exc.headers else None
                return OpenAIError(exc.status_code, code, message, headers=headers).response()

        return openai_errors


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    # OpenAI answers 400 to any invalid request (APIX's own API uses 422).
    errors = exc.errors()
    if not errors:
        return invalid("the request is not valid")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return OpenAIError(400, "malformed_json", "the request body is not valid JSON")
    param = ".".join(loc) or None
    return invalid(f"{param or 'body'}: {first.get('msg', 'invalid')}", param)


# --- request and response bodies -------------------------------------------------------


def _storable(value: str) -> str:
    # PostgreSQL text holds neither NUL nor lone surrogates: refuse them here, not with a 500.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid Unicode text") from exc
    return value


Text = Annotated[str, AfterValidator(_storable)]
_Open = ConfigDict(extra="allow")  # OpenAI fields APIX does not use are accepted, ignored


class ContentPart(BaseModel):
    model_config = _Open
    type: str
    text: Text | None = None


class RequestMessage(BaseModel):
    model_config = _Open
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | list[ContentPart] | None = None
    tool_calls: list[Any] | None = None


class StreamOptions(BaseModel):
    model_config = _Open
    include_usage: bool | None = None


class ResponseFormat(BaseModel):
    model_config = _Open
    type: str


class ChatCompletionCreate(BaseModel):
    """OpenAI's chat-completions request; `model` is an agent's slug."""

    model_config = _Open
    model: Text = Field(min_length=1, max_length=200)
    messages: list[RequestMessage] = Field(min_length=1, max_length=1000)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1)
    user: Text | None = Field(None, max_length=200)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    apix_session_id: uuid.UUID | None = Field(
        None, description=f"APIX extension (or the `{SESSION_HEADER}` header): continue a session."
    )


class CompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


class Choice(BaseModel):
    index: int = 0
    message: CompletionMessage
    finish_reason: Literal["stop"] = "stop"
    logprobs: None = None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    system_fingerprint: str | None = None


class ModelObject(BaseModel):
    id: str = Field(description="The agent's slug.")
    object: Literal["model"] = "model"
    created: int
    owned_by: str = Field(description="The organisation's id.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


# --- translation ----------------------------------------------------------------------


@dataclass(frozen=True)
class Conversation:
    """What a request asks of the agent, in APIX's terms."""

    input: str  # the last user message: the run's input
    history: list[tuple[Literal["user", "assistant"], str]]  # earlier turns, oldest first
    instructions: str | None  # the caller's system and developer messages


def conversation(body: ChatCompletionCreate) -> Conversation:
    """The run a request describes, or a 400 for what an agent run cannot do."""
    if body.n is not None and body.n > 1:
        raise invalid("n > 1 is not supported: an agent run gives one answer", "n")
    if body.tools or body.functions:
        param = "tools" if body.tools else "functions"
        raise invalid("tools are not supported here: an agent uses its own tools", param)
    if body.response_format is not None and body.response_format.type != "text":
        raise invalid("only the text response format is supported", "response_format")
    if body.logprobs:
        raise invalid("logprobs are not supported", "logprobs")
    history: list[tuple[Literal["user", "assistant"], str]] = []
    instructions: list[str] = []
    *earlier, last = body.messages
    for i, message in enumerate(earlier):
        text = _text(message, i)
        if message.role in ("system", "developer"):
            if text:
                instructions.append(text)
        elif text:
            history.append(("assistant" if message.role == "assistant" else "user", text))
    param = f"messages.{len(earlier)}"
    if last.role != "user":
        raise invalid("the last message must be the user's: it is the run's input", param)
    text = _text(last, len(earlier))
    if not text.strip():
        raise invalid("the last user message is empty", f"{param}.content")
    if len(text) > _MAX_INPUT:
        raise invalid(f"the last user message exceeds {_MAX_INPUT} characters", param)
    return Conversation(text, history, "\n\n".join(instructions) or None)


def _text(message: RequestMessage, index: int) -> str:
    param = f"messages.{index}"
    if message.role in ("tool", "function"):
        raise invalid("tool results are not supported: an agent runs its own tools", param)
    if message.tool_calls:
        raise invalid("tool calls are not supported", f"{param}.tool_calls")
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise invalid("only text content parts are supported", f"{param}.content")
        texts.append(part.text)
    return "".join(texts)


def completion_id(run_id: uuid.UUID) -> str:
    return f"chatcmpl-{run_id}"


def usage_of(usage: Any) -> CompletionUsage:
    usage = usage if isinstance(usage, dict) else {}
    prompt = _tokens(usage.get("input_tokens"))
    completion = _tokens(usage.get("output_tokens"))
    return CompletionUsage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _tokens(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# What a failed run's error code means to an OpenAI client; anything else is the agent
# being unable to answer now (503, which the SDKs retry).
_RUN_ERRORS = {"provider_rate_limited": 429, "provider_bad_request": 400}


def run_error(run: RunRead) -> OpenAIError:
    """The error a run that did not complete ends a request with."""
    if run.status == "cancelled":
        # Retrying would only start the run again: tell the SDKs not to.
        return OpenAIError(
            409, "run_cancelled", "the run was cancelled", headers={"x-should-retry": "false"}
        )
    error = run.error or {}
    code = str(error.get("code") or "run_failed")
    message = str(error.get("message") or "the agent could not answer")
    status = _RUN_ERRORS.get(code, 503)
    details = error.get("details")
    hops = details.get("hops") if isinstance(details, dict) else None
    if hops and all(isinstance(h, dict) and h.get("reason") in _RUN_ERRORS for h in hops):
        # Every provider refused the same way (all rate limiting, say): that is the answer.
        reasons = {_RUN_ERRORS[h["reason"]] for h in hops}
        status = reasons.pop() if len(reasons) == 1 else status
    return OpenAIError(status, code, message)


# --- one turn -------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """A run started for a request, and where to follow it from."""

    run: RunRead
    model: str
    channel: str
    position: Position

    @property
    def created(self) -> int:
        return int(self.run.created_at.timestamp())

    @property
    def headers(self) -> dict[str, str]:
        headers = {RUN_HEADER: str(self.run.id)}
        if self.run.session_id is not None:
            headers[SESSION_HEADER] = str(self.run.session_id)
        return headers


async def published_agent(rt: AgentsRuntime, principal: Principal, slug: str) -> Agent:
    """The organisation's agent named by ``slug``, when it has a published version."""
    if not _SLUG.match(slug):
        raise model_not_found(slug)
    assert principal.org_id is not None  # noqa: S101 - `require` ensures an organisation
    try:
        async with rt.database.transaction(principal.org_id) as uow:
            agent = await service.agent_by_slug(uow, principal.org_id, slug)
    except service.AgentNotFound:
        raise model_not_found(slug) from None
    if agent.latest_version is None:
        raise model_not_found(slug, "has no published version")
    return agent


async def start_turn(
    rt: AgentsRuntime,
    principal: Principal,
    body: ChatCompletionCreate,
    session_id: uuid.UUID | None,
    meta: RequestMeta,
) -> Turn:
    """Queue the run a request asks for: in the session named, or in a new session that
    holds the request's earlier messages as its history."""
    asked = conversation(body)
    agent = await published_agent(rt, principal, body.model)
    org_id = agent.org_id
    if session_id is None:
        variables = {INSTRUCTIONS: asked.instructions} if asked.instructions else {}
        session = await service.create_session(
            rt,
            principal,
            SessionCreate(agent_id=agent.id, end_user_id=body.user or None, variables=variables),
            meta,
        )
        session_id = session.id
        await _seed(rt, org_id, session_id, asked.history)
    follow = _channel(principal, org_id, agent.id, session_id)
    before = await rt.broker.read(follow)
    metadata: dict[str, Any] = {"source": "openai"}
    if body.user:
        metadata["user"] = body.user
    try:
        run, _ = await service.create_run(
            rt,
            principal,
            agent.id,
            RunCreate(input=asked.input, session_id=session_id, metadata=metadata),
            meta,
        )
    except (service.SessionNotFound, BadRequest) as exc:
        # Only a session the caller named can be missing or another agent's.
        raise OpenAIError(exc.status_code, exc.code, exc.message, param="apix_session_id") from None
    position = Position(offset=before.last_offset, epoch=before.epoch)
    return Turn(run, agent.slug, follow.name, position)


async def _seed(
    rt: AgentsRuntime,
    org_id: uuid.UUID,
    session_id: uuid.UUID,
    history: list[tuple[Literal["user", "assistant"], str]],
) -> None:
    """Store a new session's earlier messages, dated just before the run's input."""
    if not history:
        return
    now = datetime.now(UTC)
    async with rt.database.transaction(org_id) as uow:
        for i, (role, content) in enumerate(history):
            uow.session.add(
                ChatMessage(
                    org_id=org_id,
                    session_id=session_id,
                    role=role,
                    content=content,
                    created_at=now - timedelta(microseconds=len(history) - i),
                )
            )
        await uow.session.flush()


def _channel(
    principal: Principal, org_id: uuid.UUID, agent_id: uuid.UUID, session_id: uuid.UUID
) -> channels.ChannelRef:
    """Follow the session's channel (this conversation's events only) when the caller may,
    else the agent's (keys scoped below developer may subscribe to that one only)."""
    session = service.session_channel(org_id, session_id)
    try:
        channels.check_subscribe(principal, session)
    except Forbidden:
        return service.agent_channel(org_id, agent_id)
    return session


Event = tuple[str, dict[str, Any]]
_ENDINGS = frozenset(f"agent.run.{status}" for status in TERMINAL)


async def run_events(
    gateway: Gateway, principal: Principal, turn: Turn
) -> AsyncGenerator[Event | None, None]:
    """The run's events (type, data) until it ends; None for each heartbeat. Stops early
    when the stream does (the client fell behind, Redis was interrupted): then read the run."""
    marker = f'"run_id":"{turn.run.id}"'
    stream = await open_stream(gateway, principal, [turn.channel], {turn.channel: turn.position})
    try:
        async for chunk in stream:
            for part in chunk.split("\n\n"):
                if part.startswith(":"):
                    yield None
                    continue
                if marker not in part:
                    continue
                kind, data = _sse_fields(part)
                if data.get("run_id") != str(turn.run.id):
                    continue
                yield kind, data
                if kind in _ENDINGS:
                    return
    finally:
        if isinstance(stream, AsyncGenerator):
            await stream.aclose()


def _sse_fields(part: str) -> Event:
    kind, frame = "", "{}"
    for line in part.split("\n"):
        name, _, value = line.partition(": ")
        if name == "event":
            kind = value
        elif name == "data":
            frame = value
    data = loads(frame).get("data")
    return kind, data if isinstance(data, dict) else {}


async def settled_run(rt: AgentsRuntime, principal: Principal, run_id: uuid.UUID) -> RunRead:
    """The run once it has ended (read from the database)."""
    while True:
        run = await service.get_run(rt, principal, run_id)
        if run.status in TERMINAL:
            return run
        await asyncio.sleep(_POLL_S)


async def abandon(
    rt: AgentsRuntime, principal: Principal, run_id: uuid.UUID, meta: RequestMeta
) -> None:
    """Cancel the run of a request whose client went away (nobody can receive the answer:
    OpenAI's protocol has no way to resume it). Shielded: runs while the request is cancelled."""
    with anyio.move_on_after(_CANCEL_GRACE_S, shield=True):
        try:
            await service.cancel_run(rt, principal, run_id, meta)
        except Exception:
            log.warning(
                "openai: could not cancel an abandoned run", run_id=str(run_id), exc_info=True
            )


async def complete(
    rt: AgentsRuntime,
    gateway: Gateway,
    principal: Principal,
    turn: Turn,
    request: Request,
    meta: RequestMeta,
) -> ChatCompletion:
    """Wait for the run; cancel it if the client disconnects first."""
    finished = asyncio.create_task(_finished(rt, gateway, principal, turn))
    gone = asyncio.create_task(_disconnected(request.receive))
    settled = False
    try:
        await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not finished.done():
            raise OpenAIError(499, "client_closed_request", "the client went away")
        run = finished.result()
        settled = True
    finally:
        for task in (finished, gone):
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.wait({finished, gone})
        if not settled:
            await abandon(rt, principal, turn.run.id, meta)
    if run.status != "completed":
        raise run_error(run)
    return ChatCompletion(
        id=completion_id(run.id),
        created=turn.created,
        model=turn.model,
        choices=[Choice(message=CompletionMessage(content=run.output or ""))],
        usage=usage_of(run.usage),
    )


async def _finished(
    rt: AgentsRuntime, gateway: Gateway, principal: Principal, turn: Turn
) -> RunRead:
    async with contextlib.aclosing(run_events(gateway, principal, turn)) as events:
        async for event in events:
            if event is not None and event[0] in _ENDINGS:
                break
    return await settled_run(rt, principal, turn.run.id)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class TurnStream:
    """A run as `chat.completion.chunk` server-sent events, ending with `data: [DONE]`.

    A `message.reset` after text was sent (the provider failed mid-answer and the agent
    starts over on a fallback) cannot be expressed to an OpenAI client: the stream ends
    with an error event, and the run is cancelled as when the client disconnects.
    """

    def __init__(
        self,
        rt: AgentsRuntime,
        gateway: Gateway,
        principal: Principal,
        turn: Turn,
        *,
        include_usage: bool,
        meta: RequestMeta,
    ) -> None:
        self.rt = rt
        self.gateway = gateway
        self.principal = principal
        self.turn = turn
        self.include_usage = include_usage
        self.meta = meta
        self.settled = False  # the client was told how the run ended

    async def close(self) -> None:
        """Once the response is over: cancel the run if its client left before its end
        (the stream may have stopped anywhere, or never started)."""
        if not self.settled:
            await abandon(self.rt, self.principal, self.turn.run.id, self.meta)

    async def chunks(self) -> AsyncGenerator[str, None]:
        chunk = _ChunkMaker(self.turn, self.include_usage)
        sent: list[str] = []
        usage: Any = None
        yield chunk.delta({"role": "assistant", "content": ""})
        events = run_events(self.gateway, self.principal, self.turn)
        async with contextlib.aclosing(events):
            async for event in events:
                if event is None:
                    yield ": keep-alive\n\n"
                    continue
                kind, data = event
                if kind == "message.delta" and isinstance(data.get("text"), str):
                    sent.append(data["text"])
                    yield chunk.delta({"content": data["text"]})
                elif kind == "message.reset" and sent:
                    yield _error_event(
                        OpenAIError(
                            503,
                            "answer_restarted",
                            "the model failed mid-answer and the agent restarted it on a "
                            "fallback provider; the partial answer is void: retry the request",
                        )
                    )
                    return
                elif kind in _ENDINGS:
                    usage = data.get("usage") if kind == "agent.run.completed" else None
                    break
        run = await settled_run(self.rt, self.principal, self.turn.run.id)
        self.settled = True
        if run.status != "completed":
            yield _error_event(run_error(run))
            return
        streamed, output = "".join(sent), run.output or ""
        if output != streamed:
            # The stream ended early (we fell behind, or Redis was interrupted): the rest
            # comes from the stored answer when it continues what was sent.
            if not output.startswith(streamed):
                yield _error_event(
                    OpenAIError(503, "stream_interrupted", "the answer could not be streamed")
                )
                return
            yield chunk.delta({"content": output[len(streamed) :]})
        yield chunk.finish()
        if self.include_usage:
            yield chunk.usage(usage_of(usage if usage is not None else run.usage))
        yield "data: [DONE]\n\n"

    def response(self) -> StreamingResponse:
        return _ClosingStream(
            self.chunks(),
            on_close=self.close,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **self.turn.headers},
        )


class _ChunkMaker:
    def __init__(self, turn: Turn, include_usage: bool) -> None:
        self.base = {
            "id": completion_id(turn.run.id),
            "object": "chat.completion.chunk",
            "created": turn.created,
            "model": turn.model,
            "system_fingerprint": None,
        }
        self.include_usage = include_usage

    def _event(self, choices: list[dict[str, Any]], usage: CompletionUsage | None = None) -> str:
        body: dict[str, Any] = {**self.base, "choices": choices}
        if self.include_usage:
            body["usage"] = usage.model_dump() if usage is not None else None
        return f"data: {dumps(body).decode()}\n\n"

    def delta(self, delta: dict[str, Any]) -> str:
        return self._event([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def finish(self) -> str:
        return self._event([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}])

    def usage(self, usage: CompletionUsage) -> str:
        return self._event([], usage)


def _error_event(error: OpenAIError) -> str:
    # The OpenAI SDKs raise `APIError` for a streamed object with an `error` key.
    return f"data: {dumps(error.body()).decode()}\n\n"


class _ClosingStream(StreamingResponse):
    """A streaming response that, however the client left, closes its iterator and then
    runs ``on_close``."""

    def __init__(
        self,
        content: AsyncGenerator[str, None],
        *,
        on_close: Callable[[], Awaitable[None]],
        media_type: str,
        headers: dict[str, str],
    ) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self.chunks = content
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.chunks.aclose()
                await self.on_close()


# --- routes ---------------------------------------------------------------------------

router = APIRouter(
    prefix="/api/v1/openai",
    tags=["openai"],
    route_class=_OpenAIRoute,
    responses={
        status: {"model": OpenAIErrorResponse} for status in (400, 401, 403, 404, 409, 429, 503)
    },
)

Writer = Annotated[Principal, Depends(require("agents:write"))]
Reader = Annotated[Principal, Depends(require("agents:read"))]


@router.post(
    "/chat/completions",
    response_model=None,
    responses={200: {"model": ChatCompletion, "content": {"text/event-stream": {}}}},
)
async def create_chat_completion(
    request: Request,
    body: ChatCompletionCreate,
    principal: Writer,
    rt: Runtime,
    meta: Meta,
    response: Response,
    x_apix_session_id: Annotated[uuid.UUID | None, Header()] = None,
) -> ChatCompletion | StreamingResponse:
    """Run an agent as an OpenAI chat completion (`model` is the agent's slug).

    The run lives as long as the request: it is cancelled when the client disconnects.
    """
    gateway: Gateway = request.app.state.gateway
    session_id = body.apix_session_id or x_apix_session_id
    turn = await start_turn(rt, principal, body, session_id, meta)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = TurnStream(rt, gateway, principal, turn, include_usage=include_usage, meta=meta)
        return stream.response()
    response.headers.update(turn.headers)
    return await complete(rt, gateway, principal, turn, request, meta)


@router.get("/models")
async def list_models(principal: Reader, rt: Runtime) -> ModelList:
    """The organisation's published agents, as OpenAI models."""
    agents = await service.list_agents(rt, principal)
    return ModelList(
        data=[
            _model(a.slug, a.created_at, principal) for a in agents if a.latest_version is not None
        ]
    )


@router.get("/models/{model}")
async def get_model(model: str, principal: Reader, rt: Runtime) -> ModelObject:
    """One published agent, as an OpenAI model."""
    agent = await published_agent(rt, principal, model)
    return _model(agent.slug, agent.created_at, principal)


def _model(slug: str, created_at: datetime, principal: Principal) -> ModelObject:
    return ModelObject(id=slug, created=int(created_at.timestamp()), owned_by=str(principal.org_id))
