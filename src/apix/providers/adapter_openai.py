"""The OpenAI chat-completions adapter: OpenAI itself, any compatible server, and Gemini.

Imported on the first call to a provider of its kind (`apix.providers.adapters`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import openai

from apix.providers.adapters import NO_KEY, map_error
from apix.providers.types import (
    AdapterChunk,
    ChatMessage,
    ChatRequest,
    ProviderConfig,
    StreamEnd,
    TextDelta,
    Usage,
)

__all__ = ["OpenAIAdapter"]


class OpenAIAdapter:
    """OpenAI chat completions: OpenAI itself, any compatible server, and Gemini."""

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config

    def _client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            api_key=self.config.api_key or NO_KEY,
            base_url=self.config.base_url,
            timeout=self.config.timeout_s,
            max_retries=0,
        )

    async def stream(self, request: ChatRequest) -> AsyncGenerator[AdapterChunk, None]:
        model = request.model or self.config.default_model
        usage = Usage()
        finish: str | None = None
        try:
            async with self._client() as client:
                stream = await client.chat.completions.create(
                    model=model,
                    messages=[_openai_message(m) for m in request.messages],
                    stream=True,
                    stream_options={"include_usage": True},
                    max_tokens=openai.omit if request.max_tokens is None else request.max_tokens,
                    temperature=(
                        openai.omit if request.temperature is None else request.temperature
                    ),
                )
                async with stream:
                    async for chunk in stream:
                        model = chunk.model or model
                        if chunk.usage is not None:
                            usage = Usage(
                                chunk.usage.prompt_tokens or 0, chunk.usage.completion_tokens or 0
                            )
                        for choice in chunk.choices:
                            if choice.finish_reason:
                                finish = choice.finish_reason
                            if choice.delta.content:
                                yield TextDelta(choice.delta.content)
        except Exception as exc:
            raise map_error(exc) from exc
        yield StreamEnd(model=model, usage=usage, finish_reason=finish)

    async def ping(self) -> None:
        try:
            async with self._client() as client:
                await client.models.list()
        except Exception as exc:
            raise map_error(exc) from exc


def _openai_message(message: ChatMessage) -> openai.types.chat.ChatCompletionMessageParam:
    if message.role == "system":
        return {"role": "system", "content": message.content}
    if message.role == "assistant":
        return {"role": "assistant", "content": message.content}
    return {"role": "user", "content": message.content}
