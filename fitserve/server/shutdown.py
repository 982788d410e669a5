"""Graceful shutdown that ends every stream properly, also when the grace period runs out.

uvicorn's own `timeout_graceful_shutdown` cancels the response tasks that are still running
when it expires: clients get a chunked body cut mid-chunk (no `finish_reason`, no
`data: [DONE]`) and the log gets a traceback per stream. Instead, when fitserve's grace
period ends, the engine aborts every request it still runs; each stream then finishes the
ordinary way, with `finish_reason: "abort"` and `[DONE]`, and uvicorn finds no connection
left to cut. uvicorn's own timeout stays as a backstop a few seconds later.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn

from fitserve.engine.async_engine import AsyncLLMEngine

logger = logging.getLogger(__name__)

BACKSTOP_SECONDS = 5.0
"""How long after the abort uvicorn still waits for responses to end before cancelling them."""


class DrainingServer(uvicorn.Server):
    """A uvicorn server that aborts the engine's requests once `grace_seconds` have passed."""

    def __init__(self, config: uvicorn.Config, async_engine: AsyncLLMEngine, grace_seconds: float) -> None:
        config.timeout_graceful_shutdown = grace_seconds + BACKSTOP_SECONDS
        super().__init__(config)
        self._async_engine = async_engine
        self._grace_seconds = grace_seconds

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        abort_task = asyncio.ensure_future(self._abort_after_grace())
        try:
            await super().shutdown(sockets)
        finally:
            abort_task.cancel()

    async def _abort_after_grace(self) -> None:
        await asyncio.sleep(self._grace_seconds)
        if self._async_engine.num_live_requests:
            logger.warning("shutdown: %d request(s) still running after %g s; aborting them",
                           self._async_engine.num_live_requests, self._grace_seconds)
        self._async_engine.abort_all()
