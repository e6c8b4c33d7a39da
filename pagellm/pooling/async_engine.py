"""AsyncPoolingEngine: the server's front of a PoolingEngine, in the server's process.

Requests from concurrent HTTP calls wait in the engine's one queue; one loop task schedules a batch on the event
loop (the queue is only ever touched there) and runs the model in a thread, so requests that arrive while a
step runs share the next step, and the server keeps answering meanwhile."""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

from pagellm.config import EngineConfig
from pagellm.pooling.engine import PoolingEngine, PoolingPrompt
from pagellm.pooling.outputs import PoolingRequestOutput

logger = logging.getLogger(__name__)


class AsyncPoolingEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.engine = PoolingEngine(config)
        self.model_config = config.model_config
        self.served_model_name = config.model_config.served_model_name or config.model_config.model
        self._pending: dict[str, asyncio.Future] = {}
        self._wake: Optional[asyncio.Event] = None
        self._loop_task: Optional[asyncio.Task] = None

    @property
    def is_healthy(self) -> bool:
        """False once the step loop has ended (it only ends by a bug or by shutdown)."""
        return self._loop_task is None or not self._loop_task.done()

    def validate(self, prompts: list[PoolingPrompt], dimensions: Optional[int], field: str) -> list[list[int]]:
        """Token ids of every prompt, or a ValueError naming the first bad one (before anything is queued)."""
        self.engine.pooler_config.check_dimensions(dimensions)
        if not prompts:
            raise ValueError(f"{field}: the input is empty")
        one = len(prompts) == 1
        return [self.engine.tokenize(p, field if one else f"{field}[{i}]") for i, p in enumerate(prompts)]

    async def encode(self, token_ids: list[list[int]], dimensions: Optional[int] = None
                     ) -> list[PoolingRequestOutput]:
        """Pooled vectors of already validated prompts, in order. Cancelling (client gone) drops them."""
        if not self.is_healthy:
            raise RuntimeError("the pooling engine's step loop has stopped")
        loop = asyncio.get_running_loop()
        if self._loop_task is None:
            self._wake = asyncio.Event()
            self._loop_task = loop.create_task(self._run_loop())
        ids = [self.engine.next_request_id() for _ in token_ids]
        futures = []
        for request_id, ids_ in zip(ids, token_ids):
            self.engine.add_request(request_id, ids_, dimensions)
            futures.append(self._pending.setdefault(request_id, loop.create_future()))
        self._wake.set()
        try:
            return list(await asyncio.gather(*futures))
        finally:
            gone = [i for i, f in zip(ids, futures) if not f.done()]
            if gone:
                self.engine.abort_request(gone)
            for i in ids:
                self._pending.pop(i, None)

    async def _run_loop(self) -> None:
        engine = self.engine
        while True:
            await self._wake.wait()
            self._wake.clear()
            while engine.has_unfinished_requests():
                batch = engine.schedule()
                try:
                    outputs = await asyncio.to_thread(engine.run, batch)
                except Exception as e:  # noqa: BLE001 - every waiter gets the error
                    logger.exception("pooling step failed")
                    for r in batch:
                        fut = self._pending.get(r.request_id)
                        if fut is not None and not fut.done():
                            fut.set_exception(e)
                    continue
                for out in outputs:
                    fut = self._pending.get(out.request_id)
                    if fut is not None and not fut.done():
                        fut.set_result(out)

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
