"""`LocalModel`: the runtime's model interface over the in-process engine and its chat format."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from .llm import ChatOptions, ChatReply, ToolCallRequest, Usage


class LocalModel:
    """Renders conversations with the checkpoint's chat format, runs them on the shared `Engine`
    (tool calls constrained to the tools' schemas, the thinking budget enforced by the engine) and
    parses the output. Token ids and logprobs are kept on the reply exactly as the engine used them.

    `max_inflight` bounds requests handed to the engine at once: agents beyond it wait here
    (backpressure), so the engine's queue stays short and its prefix ordering meaningful.

    >>> model = await LocalModel.load("tiny")                                 # doctest: +SKIP
    >>> reply = await model.chat([{"role": "user", "content": "hi"}], None, ChatOptions(max_tokens=16))
    """

    def __init__(self, lm: Any, engine: Any, *, max_inflight: int | None = None):
        self.lm, self.engine = lm, engine
        self.format = lm.chat_format
        self.name = f"local:{Path(lm.path).name}"
        self.max_concurrency = max_inflight or 2 * engine.config.max_running  # calls let through at once
        self._gate = asyncio.Semaphore(self.max_concurrency)

    @classmethod
    async def load(cls, model: str | Path = "tiny", engine_config: Any = None, **kwargs: Any) -> LocalModel:
        from agentrt.model import Engine, load

        lm = await asyncio.to_thread(load, model)
        return cls(lm, Engine(lm, engine_config), **kwargs)

    async def start(self) -> None:
        self.engine.start()

    async def close(self) -> None:
        await self.engine.stop()

    def stats(self) -> Any:
        return self.engine.stats()

    async def chat(self, messages: list[dict], tools: list[dict] | None, options: ChatOptions) -> ChatReply:
        from agentrt.model import Constraint, Request, SamplingParams, ThinkingBudget

        started = time.perf_counter()
        thinking = options.think_tokens
        ids = self.format.render(messages, tools, enable_thinking=thinking != 0)
        max_tokens = options.max_tokens
        if options.max_total_tokens is not None:
            max_tokens = min(max_tokens, options.max_total_tokens - len(ids))
            if max_tokens <= 0:
                return ChatReply(finish_reason="budget", prompt_ids=ids)
        constraint = None
        if tools and options.constrain_tools:
            constraint = Constraint(tools=tools, require_call=options.require_call,
                                    parallel_calls=options.parallel_calls)
        request = Request(
            prompt_ids=ids,
            sampling=SamplingParams(temperature=options.temperature, top_p=options.top_p,
                                    max_tokens=max_tokens, seed=options.seed, stop=list(options.stop)),
            constraint=constraint,
            thinking=ThinkingBudget(thinking, options.think_grace) if thinking else None,
            session=options.session,
        )
        async with self._gate:
            handle = self.engine.submit(request)
            try:
                result = await handle.result()
            except asyncio.CancelledError:
                handle.cancel()
                raise
        if result.error:
            raise RuntimeError(f"the engine failed request {result.id}: {result.error}")
        text = self.lm.tokenizer.decode(result.token_ids)
        parsed = self.format.parse(text, thinking_open=self.engine.opens_thinking(ids), tools=tools)
        c = result.counts
        return ChatReply(
            content=parsed.content,
            reasoning=parsed.reasoning,
            tool_calls=[ToolCallRequest(call.id, call.name, call.arguments) for call in parsed.tool_calls],
            errors=[ToolCallRequest(f"call_error_{i}", "invalid_tool_call", f"{e.message}; you wrote: {e.raw[:200]}")
                    for i, e in enumerate(parsed.errors)],
            finish_reason="tool_calls" if parsed.tool_calls else str(result.finish_reason),
            usage=Usage(prompt_tokens=c.prompt, cached_tokens=c.cached_prompt, thinking_tokens=c.thinking,
                        output_tokens=c.output),
            prompt_ids=ids,
            token_ids=list(result.token_ids),
            logprobs=list(result.logprobs),
            seconds=time.perf_counter() - started,
        )
