"""The runner: executes queued agent runs (in `apix worker`, or in-process by default).

Runs are queued on the Redis stream `RUN_QUEUE` and read through the consumer group
`RUN_GROUP`, several at a time. While a run executes, its runner keeps the entry's idle
time at zero; an entry idle for `run_claim_ms` belonged to a runner that died, and the
runner that claims it fails the run cleanly (`worker_lost`) if it had started, or runs it
if it had not: a run is never left `running`.

The answer is streamed through the providers' routing layer and published as
`message.delta` events, batched to one per `_DELTA_S` per run. Cancellation is checked as
often, so a cancelled run stops within a second even while the provider is silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import ResponseError
from sqlalchemy import and_, exists, select

from apix.agents.events import (
    MessageCompleted,
    MessageCreated,
    MessageDelta,
    MessageReset,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunStarted,
)
from apix.agents.models import AgentRun, AgentVersion, ChatMessage, ChatSession
from apix.agents.schemas import AgentConfig
from apix.agents.service import (
    RUN_GROUP,
    RUN_QUEUE,
    AgentsRuntime,
    cancel_key,
    message_read,
    publish,
    run_channels,
)
from apix.config import WorkerSettings
from apix.core.errors import AppError
from apix.core.logging import get_logger
from apix.core.tasks import Periodic
from apix.providers import routing
from apix.providers.events import ProviderFallback
from apix.providers.runtime import ProvidersRuntime
from apix.providers.types import ChatMessage as Prompt
from apix.providers.types import ChatRequest, Completed, Reset, TextDelta
from apix.realtime.channels import ChannelRef

log = get_logger(__name__)

_DELTA_S = 0.05  # at most one message.delta per run per 50 ms
_CANCEL_CHECK_S = 0.25
_HEARTBEAT_S = 5.0
_CHARS_PER_TOKEN = 4  # the context budget's estimate; providers report the real counts
_SUMMARY_TOKENS = 400
_SUMMARY_PROMPT = (
    "Summarise the conversation below for whoever continues it: keep facts, names, numbers, "
    "decisions and open questions; at most 200 words. Reply with the summary only."
)


@dataclass
class _Active:
    entry_id: str
    task: asyncio.Task[None]


@dataclass
class RunnerStats:
    started: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    recovered: int = 0


@dataclass
class _Answer:
    """What a run has produced so far."""

    run: AgentRun
    channels: list[ChannelRef]
    text: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # not published yet
    seq: int = 0
    completed: Completed | None = None


class Runner:
    def __init__(
        self,
        rt: AgentsRuntime,
        providers: ProvidersRuntime,
        settings: WorkerSettings,
        *,
        consumer: str,
    ) -> None:
        self.rt = rt
        self.providers = providers
        self.settings = settings
        self.consumer = consumer
        self.active: dict[uuid.UUID, _Active] = {}
        self.stats = RunnerStats()
        self._next_claim = 0.0
        self._next_heartbeat = 0.0
        self._loop = Periodic("apix-runner", 0.0, self.step)
        self._chores: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        try:
            await self.rt.redis.xgroup_create(RUN_QUEUE, RUN_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._loop.start()

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop taking runs; give running ones ``grace_s`` to finish, then fail them."""
        await self._loop.stop()
        tasks = [a.task for a in self.active.values()]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=5)

    async def step(self) -> None:
        now = time.monotonic()
        try:
            if now >= self._next_claim:
                self._next_claim = now + max(1.0, self.settings.run_claim_ms / 3000)
                await self._claim_abandoned()
            if self.active and now >= self._next_heartbeat:
                self._next_heartbeat = now + _HEARTBEAT_S
                ids: list[Any] = [a.entry_id for a in self.active.values()]
                await self.rt.redis.xclaim(RUN_QUEUE, RUN_GROUP, self.consumer, 0, ids, justid=True)
            room = self.settings.max_runs - len(self.active)
            if room <= 0:
                await asyncio.sleep(0.05)
                return
            replies: Any = await self.rt.redis.xreadgroup(
                RUN_GROUP, self.consumer, {RUN_QUEUE: ">"}, count=room, block=500
            )
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # Redis lost its data: make the group again
                await self.start_group()
                return
            raise
        for _key, items in replies or []:
            for entry_id, fields in items:
                self._spawn(entry_id.decode(), fields, recovered=False)

    async def start_group(self) -> None:
        with contextlib.suppress(ResponseError):
            await self.rt.redis.xgroup_create(RUN_QUEUE, RUN_GROUP, id="0", mkstream=True)

    async def _claim_abandoned(self) -> None:
        start = "0-0"
        while True:
            reply: Any = await self.rt.redis.xautoclaim(
                RUN_QUEUE,
                RUN_GROUP,
                self.consumer,
                min_idle_time=self.settings.run_claim_ms,
                start_id=start,
                count=100,
            )
            start, claimed = reply[0], reply[1]
            start = start.decode() if isinstance(start, bytes) else start
            for entry_id, fields in claimed:
                if fields:
                    self._spawn(entry_id.decode(), fields, recovered=True)
                else:
                    await self._done(entry_id.decode())
            if start == "0-0" or not claimed:
                return

    def _spawn(self, entry_id: str, fields: dict[bytes, bytes], *, recovered: bool) -> None:
        try:
            run_id = uuid.UUID(fields[b"run"].decode())
            org_id = uuid.UUID(fields[b"org"].decode())
        except (KeyError, ValueError):
            log.warning("runner: dropping an unreadable queue entry", entry_id=entry_id)
            task = asyncio.create_task(self._done(entry_id))
            self._chores.add(task)
            task.add_done_callback(self._chores.discard)
            return
        if run_id in self.active:
            return
        task = asyncio.create_task(
            self._execute(entry_id, org_id, run_id, recovered=recovered), name=f"run-{run_id}"
        )
        self.active[run_id] = _Active(entry_id, task)

    async def _done(self, entry_id: str) -> None:
        async with self.rt.redis.pipeline(transaction=False) as pipe:
            pipe.xack(RUN_QUEUE, RUN_GROUP, entry_id)
            pipe.xdel(RUN_QUEUE, entry_id)
            await pipe.execute()

    # --- one run ------------------------------------------------------------------------

    async def _execute(
        self, entry_id: str, org_id: uuid.UUID, run_id: uuid.UUID, *, recovered: bool
    ) -> None:
        try:
            run = await self._begin(org_id, run_id, recovered=recovered)
            if run is not None:
                await self._answer(run)
            await self._done(entry_id)
        except asyncio.CancelledError:
            # The worker is stopping and the grace period is over: fail the run cleanly.
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    self._finish_failed(org_id, run_id, "worker_stopped", "the worker stopped")
                )
                await asyncio.shield(self._done(entry_id))
            raise
        except Exception:
            # Left pending: another runner claims it and fails it cleanly (never `running`).
            log.exception("runner: run failed unexpectedly", run_id=str(run_id))
        finally:
            self.active.pop(run_id, None)

    async def _begin(
        self, org_id: uuid.UUID, run_id: uuid.UUID, *, recovered: bool
    ) -> AgentRun | None:
        """Mark the run `running` (when it may start); None when there is nothing to do."""
        while True:
            async with self.rt.database.transaction(org_id) as uow:
                run = await uow.session.scalar(
                    select(AgentRun).where(AgentRun.id == run_id).with_for_update()
                )
                if run is None or run.status in ("completed", "failed", "cancelled"):
                    return None
                if run.status == "running":
                    if not recovered:
                        return None
                    self.stats.recovered += 1
                    await self._fail(uow, run, "worker_lost", "the worker running it stopped")
                    return None
                if run.session_id is not None and not await self._session_free(uow, run):
                    wait = True
                else:
                    wait = False
                    run.status = "running"
                    run.started_at = datetime.now(UTC)
                    run.attempts += 1
                    run.worker = self.consumer
                    await uow.session.flush()
                    uow.after_commit(self._announce_start(run))
            if not wait:
                self.stats.started += 1
                return run
            await asyncio.sleep(0.2)  # `enqueue`: the session's earlier run goes first

    def _announce_start(self, run: AgentRun) -> Callable[[], Awaitable[None]]:
        started = RunStarted(run_id=run.id, attempt=run.attempts)
        channels = run_channels(run)
        return lambda: publish(self.rt.broker, channels, "agent.run.started", started)

    async def _session_free(self, uow: Any, run: AgentRun) -> bool:
        # Locking the session serialises runners deciding for the same session.
        await uow.session.scalar(
            select(ChatSession.id).where(ChatSession.id == run.session_id).with_for_update()
        )
        ahead = await uow.session.scalar(
            select(
                exists().where(
                    AgentRun.session_id == run.session_id,
                    AgentRun.id != run.id,
                    (AgentRun.status == "running")
                    | and_(AgentRun.status == "queued", AgentRun.created_at < run.created_at),
                )
            )
        )
        return not ahead

    async def _answer(self, run: AgentRun) -> None:
        started = time.monotonic()
        answer = _Answer(run, run_channels(run))
        try:
            request, config = await self._request(run)
            producer = asyncio.create_task(self._produce(answer, request, config))
            next_cancel_check = 0.0
            while not producer.done():
                await asyncio.wait({producer}, timeout=_DELTA_S)
                await self._flush(answer)
                now = time.monotonic()
                if now >= next_cancel_check:
                    next_cancel_check = now + _CANCEL_CHECK_S
                    if await self.rt.redis.exists(cancel_key(run.id)):
                        producer.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await producer
                        await self._finish_cancelled(run, answer)
                        return
            producer.result()  # raises what the provider call raised
            await self._flush(answer)
            await self._finish_completed(run, answer, time.monotonic() - started)
        except AppError as exc:
            await self._flush(answer)
            await self._finish_failed(run.org_id, run.id, exc.code, exc.message, exc.details)

    async def _request(self, run: AgentRun) -> tuple[ChatRequest, AgentConfig]:
        async with self.rt.database.transaction(run.org_id) as uow:
            version = await uow.session.scalar(
                select(AgentVersion).where(
                    AgentVersion.agent_id == run.agent_id, AgentVersion.version == run.version
                )
            )
            if version is None:
                raise AppError("the agent version no longer exists")
            config = AgentConfig.model_validate(version.config)
            history: list[ChatMessage] = []
            session: ChatSession | None = None
            if run.session_id is not None:
                session = await uow.session.get(ChatSession, run.session_id)
                history = list(
                    await uow.session.scalars(
                        select(ChatMessage)
                        .where(ChatMessage.session_id == run.session_id)
                        .where((ChatMessage.run_id != run.id) | ChatMessage.run_id.is_(None))
                        .order_by(ChatMessage.created_at.desc(), ChatMessage.id.desc())
                        .limit(500)
                    )
                )
        history.reverse()  # oldest first
        summary = session.summary if session else None
        variables = session.variables if session else {}

        def prompt(summary: str | None) -> list[Prompt]:
            return assemble(
                config,
                variables=variables,
                summary=summary,
                history=[(m.role, m.content) for m in history],
                user_input=run.input,
                budget_tokens=self.settings.context_tokens,
            )

        messages = prompt(summary)
        kept = len(messages) - (2 if messages[0].role == "system" else 1)
        left_out = history[: len(history) - kept]
        if config.memory_enabled and session is not None and left_out:
            upto = session.summary_upto
            unsummarised = [m for m in left_out if upto is None or m.created_at > upto]
            if unsummarised:
                summary = await self._summarise(run, config, summary, unsummarised)
                messages = prompt(summary)
        request = ChatRequest(
            messages=tuple(messages),
            model=config.model,
            max_tokens=config.max_tokens,
            temperature=config.temperature,
        )
        return request, config

    async def _summarise(
        self,
        run: AgentRun,
        config: AgentConfig,
        previous: str | None,
        messages: list[ChatMessage],
    ) -> str:
        """Fold messages the budget leaves out into the session's stored summary."""
        transcript = "\n".join(f"{m.role}: {m.content}" for m in messages)
        if previous:
            transcript = f"Summary so far:\n{previous}\n\nThen:\n{transcript}"
        request = ChatRequest(
            messages=(
                Prompt(role="system", content=_SUMMARY_PROMPT),
                Prompt(role="user", content=transcript),
            ),
            model=config.model,
            max_tokens=_SUMMARY_TOKENS,
            temperature=0.0,
        )
        done = await routing.complete(
            self.providers, run.org_id, _target(config), request, agent_id=run.agent_id
        )
        async with self.rt.database.transaction(run.org_id) as uow:
            session = await uow.session.get(ChatSession, run.session_id, with_for_update=True)
            if session is not None:
                session.summary = done.text
                session.summary_upto = messages[-1].created_at
        return done.text

    async def _produce(self, answer: _Answer, request: ChatRequest, config: AgentConfig) -> None:
        async def on_fallback(hop: ProviderFallback) -> None:
            await publish(self.rt.broker, answer.channels, "provider.fallback", hop)

        async for chunk in routing.stream(
            self.providers,
            answer.run.org_id,
            _target(config),
            request,
            agent_id=answer.run.agent_id,
            on_fallback=on_fallback,
        ):
            if isinstance(chunk, TextDelta):
                answer.text.append(chunk.text)
                answer.pending.append(chunk.text)
            elif isinstance(chunk, Reset):
                answer.text.clear()
                answer.pending.clear()
                answer.seq += 1
                reset = MessageReset(run_id=answer.run.id, seq=answer.seq)
                await publish(self.rt.broker, answer.channels, "message.reset", reset)
            elif isinstance(chunk, Completed):
                answer.completed = chunk

    async def _flush(self, answer: _Answer) -> None:
        if not answer.pending:
            return
        text, answer.pending = "".join(answer.pending), []
        answer.seq += 1
        delta = MessageDelta(run_id=answer.run.id, seq=answer.seq, text=text)
        await publish(self.rt.broker, answer.channels, "message.delta", delta)

    # --- endings ------------------------------------------------------------------------

    async def _finish_completed(self, run: AgentRun, answer: _Answer, seconds: float) -> None:
        text = "".join(answer.text)
        done = answer.completed
        usage: dict[str, Any] = {}
        if done is not None:
            usage = {
                "input_tokens": done.usage.input_tokens,
                "output_tokens": done.usage.output_tokens,
                "cost_usd": float(done.cost_usd),
                "provider_id": str(done.provider_id),
                "provider_name": done.provider_name,
                "model": done.model,
                "finish_reason": done.finish_reason,
            }
        timings = {
            "total_ms": round(seconds * 1000, 3),
            "first_token_ms": done.first_token_ms if done and done.first_token_ms else 0.0,
        }
        message: ChatMessage | None = None
        async with self.rt.database.transaction(run.org_id) as uow:
            row = await uow.session.get(AgentRun, run.id, with_for_update=True)
            if row is None:
                return
            row.status = "completed"
            row.output = text
            row.usage = usage
            row.finished_at = datetime.now(UTC)
            if run.session_id is not None:
                message = ChatMessage(
                    org_id=run.org_id,
                    session_id=run.session_id,
                    role="assistant",
                    content=text,
                    tokens=usage.get("output_tokens"),
                    run_id=run.id,
                    created_at=datetime.now(UTC),
                )
                uow.session.add(message)
            await uow.session.flush()
        self.stats.completed += 1
        channels = answer.channels
        message_id = message.id if message is not None else None
        completed = MessageCompleted(run_id=run.id, message_id=message_id, text=text)
        await publish(self.rt.broker, channels, "message.completed", completed)
        if message is not None:
            created = MessageCreated(session_id=message.session_id, message=message_read(message))
            await publish(self.rt.broker, channels[1:], "session.message.created", created)
        finished = RunCompleted(run_id=run.id, usage=usage, timings=timings)
        await publish(self.rt.broker, channels, "agent.run.completed", finished)

    async def _finish_cancelled(self, run: AgentRun, answer: _Answer) -> None:
        async with self.rt.database.transaction(run.org_id) as uow:
            row = await uow.session.get(AgentRun, run.id, with_for_update=True)
            if row is None:
                return
            row.status = "cancelled"
            row.output = "".join(answer.text)
            row.finished_at = datetime.now(UTC)
        self.stats.cancelled += 1
        await self.rt.redis.delete(cancel_key(run.id))
        await publish(
            self.rt.broker, answer.channels, "agent.run.cancelled", RunCancelled(run_id=run.id)
        )

    async def _finish_failed(
        self,
        org_id: uuid.UUID,
        run_id: uuid.UUID,
        code: str,
        message: str,
        details: Any = None,
    ) -> None:
        async with self.rt.database.transaction(org_id) as uow:
            row = await uow.session.get(AgentRun, run_id, with_for_update=True)
            if row is None or row.status in ("completed", "failed", "cancelled"):
                return
            await self._fail(uow, row, code, message, details)

    async def _fail(
        self, uow: Any, row: AgentRun, code: str, message: str, details: Any = None
    ) -> None:
        row.status = "failed"
        row.error = {"code": code, "message": message, "details": details}
        row.finished_at = datetime.now(UTC)
        await uow.session.flush()
        self.stats.failed += 1
        failed = RunFailed(run_id=row.id, error=row.error)
        channels = run_channels(row)
        uow.after_commit(lambda: publish(self.rt.broker, channels, "agent.run.failed", failed))


def _target(config: AgentConfig) -> routing.Target:
    if config.provider_id is not None:
        return routing.ProviderTarget(config.provider_id, config.model)
    return config.routing_policy or "primary"


def estimate_tokens(text: str) -> int:
    return len(text) // _CHARS_PER_TOKEN + 1


def assemble(
    config: AgentConfig,
    *,
    variables: dict[str, Any],
    summary: str | None,
    history: list[tuple[str, str]],
    user_input: str,
    budget_tokens: int,
) -> list[Prompt]:
    """The prompt of a run: the system prompt with the session's variables (and summary),
    then the most recent messages that fit the budget, oldest first, then the input."""
    system = config.system_prompt
    if variables:
        lines = "\n".join(f"{k}: {v}" for k, v in sorted(variables.items()))
        system = f"{system}\n\nSession variables:\n{lines}".strip()
    if summary:
        system = f"{system}\n\nSummary of the earlier conversation:\n{summary}".strip()
    left = budget_tokens - estimate_tokens(system) - estimate_tokens(user_input)
    kept: list[Prompt] = []
    for role, content in reversed(history):
        cost = estimate_tokens(content)
        if cost > left:
            break
        left -= cost
        kept.append(Prompt(role="assistant" if role == "assistant" else "user", content=content))
    messages = [Prompt(role="system", content=system)] if system else []
    return [*messages, *reversed(kept), Prompt(role="user", content=user_input)]
