"""`AsyncLLMEngine`: the synchronous engine behind an asyncio-friendly interface.

`LLMEngine` is not thread-safe and its `step()` blocks for a whole model forward pass, so it
cannot run on the event loop. Instead one background thread owns it outright: the thread
is the only code that ever calls into the engine. The event loop talks to that thread in
two directions:

- commands (add, abort) go in through a `queue.Queue`; the thread blocks on it when the
  engine is idle, so an idle server burns no CPU;
- outputs come back through `loop.call_soon_threadsafe`, which appends them to the
  per-request `asyncio.Queue` of the `RequestStream` that is waiting for them.

Batching falls out of this for free: every request added while a step runs is picked up
before the next step, so concurrent HTTP requests share engine steps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from fitserve.engine.admission import GroupBacklog
from fitserve.engine.engine import EngineStats, LLMEngine
from fitserve.outputs import RequestOutput
from fitserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


_RESIZE_POLL_S = 0.005
"""How often an idle engine thread looks whether a resize's blocks are read."""


class EngineDeadError(RuntimeError):
    """The engine thread is not running (shut down, or never started)."""


class EngineStepError(RuntimeError):
    """A model step failed while this request was in flight; the request was aborted."""


@dataclass
class _AddCommand:
    request_id: str
    prompt: str | list[int] | dict
    sampling_params: SamplingParams
    client_id: str | None
    stream: "RequestStream"
    accepted: asyncio.Future
    group: object | None = None
    """Set for the members of one fan-out call: they are admitted interleaved with other work."""
    priority: int = 0


@dataclass
class _AbortCommand:
    request_ids: list[str]
    stream: "RequestStream | None" = None
    """When set, abort only if this very stream still owns the id (a refused duplicate must
    not abort the request that legitimately holds the id)."""


@dataclass
class _StopCommand:
    pass


@dataclass
class _AbortAllCommand:
    """Abort every request, delivering each one's final `abort` output (graceful shutdown)."""


@dataclass
class _ResizeCommand:
    budget: str | int
    done: asyncio.Future
    """Settles with the engine's WeightMemoryInfo once the switch happened, or the error."""


class RequestStream:
    """The outputs of one engine request, as the event loop sees them.

    Iterate it (`async for output in stream`) to receive cumulative `RequestOutput`s until
    the finished one. Leaving the iteration early for any reason (the consumer's task was
    cancelled because the HTTP client went away, or it simply stopped reading) aborts the
    request, so its KV blocks are freed.
    """

    def __init__(self, request_id: str, engine: "AsyncLLMEngine", output_queue: asyncio.Queue | None = None) -> None:
        self.request_id = request_id
        self.finished = False
        self._engine = engine
        # Items are (request_id, RequestOutput | exception) so that a `StreamGroup` can share one queue.
        self._queue: asyncio.Queue = output_queue if output_queue is not None else asyncio.Queue()

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait((self.request_id, item))

    def abort(self) -> None:
        """Stop the request if it is still running; safe to call at any time, any number of times."""
        if not self.finished:
            self.finished = True
            self._engine._abort_nowait([self.request_id], self)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                _, item = await self._queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                if item.finished:
                    self.finished = True
                yield item
        finally:
            # Covers cancellation (client disconnect) and GeneratorExit (consumer stopped early).
            self.abort()


class StreamGroup:
    """Several requests whose outputs interleave in arrival order through one queue.

    One OpenAI request becomes several engine requests (`n` choices, a list of prompts);
    a group lets the HTTP layer wait on all of them at once without a task per request.
    """

    def __init__(self, engine: "AsyncLLMEngine") -> None:
        self._engine = engine
        self._queue: asyncio.Queue = asyncio.Queue()
        self.streams: dict[str, RequestStream] = {}
        self.rejected_request_id: str | None = None
        """After `add_all` raised: the request the engine refused."""

    async def add_all(self, requests: list[tuple[str, str | list[int] | dict, SamplingParams]],
                      client_id: str | None = None, priority: int = 0) -> None:
        """Add (request_id, prompt, params) requests together; if any is rejected, abort them all
        and raise the first rejection (in list order).

        All commands are queued before waiting, so the engine thread takes them in one go
        between two steps instead of one request per step.
        """
        group = self if len(requests) > 1 else None
        pending = [
            self._engine._submit(request_id, prompt, params, client_id, self._queue, group, priority)
            for request_id, prompt, params in requests
        ]
        for stream, _ in pending:
            self.streams[stream.request_id] = stream
        try:
            results = await asyncio.gather(*(accepted for _, accepted in pending), return_exceptions=True)
        except BaseException:
            self.abort()  # cancelled while waiting
            raise
        for (stream, _), result in zip(pending, results):
            if isinstance(result, BaseException):
                self.rejected_request_id = stream.request_id
                self.abort()
                raise result

    @property
    def finished(self) -> bool:
        return all(stream.finished for stream in self.streams.values())

    def abort(self) -> None:
        for stream in self.streams.values():
            stream.abort()

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        """Outputs of all members, each cumulative for its own request; ends when all finished."""
        try:
            while not self.finished:
                request_id, item = await self._queue.get()
                stream = self.streams[request_id]
                if stream.finished:
                    continue
                if isinstance(item, BaseException):
                    stream.finished = True
                    raise item
                if item.finished:
                    stream.finished = True
                yield item
        finally:
            self.abort()


class AsyncLLMEngine:
    """Runs an `LLMEngine` step loop in one background thread and serves it to asyncio code."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Owned by the engine thread: which requests it still has to deliver outputs for.
        self._live_streams: dict[str, RequestStream] = {}
        self._latest_stats: EngineStats | None = None
        self._stopping = False
        # Owned by the engine thread: accepted members of fan-out calls not yet in the scheduler.
        self._backlog = GroupBacklog()

    # --- the engine's read-only facts, safe from any thread -------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        """Rows of the model's embedding: the valid range of token ids."""
        return self.engine.model_config.vocab_size

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def get_stats(self) -> EngineStats | None:
        """The stats the engine thread published after its latest iteration (None before the first)."""
        return self._latest_stats

    # --- lifecycle --------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the engine thread, delivering outputs to `loop` (default: the running loop)."""
        if self._thread is not None:
            return
        self._loop = loop or asyncio.get_running_loop()
        self._stopping = False
        self._latest_stats = self.engine.get_stats()
        self._thread = threading.Thread(target=self._run_loop, name="fitserve-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Abort whatever is still in flight and stop the thread (the engine object stays usable)."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._commands.put(_StopCommand())
        await asyncio.get_running_loop().run_in_executor(None, thread.join, timeout)
        self._thread = None

    # --- requests ---------------------------------------------------------------------------

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int] | dict,
        sampling_params: SamplingParams,
        client_id: str | None = None,
        priority: int = 0,
    ) -> RequestStream:
        """Hand a request to the engine and return its stream once the engine accepted it.

        Errors from `LLMEngine.add_request` (prompt too long, empty prompt, duplicate id) are
        raised here, before any output exists, so an HTTP layer can still answer 400.
        """
        stream, accepted = self._submit(request_id, prompt, sampling_params, client_id, None, priority=priority)
        try:
            await accepted
        except BaseException:
            # Cancelled while the command was queued (the engine may still add it), or rejected.
            stream.abort()
            raise
        return stream

    def _submit(
        self,
        request_id: str,
        prompt: str | list[int] | dict,
        sampling_params: SamplingParams,
        client_id: str | None,
        output_queue: asyncio.Queue | None,
        group: object | None = None,
        priority: int = 0,
    ) -> tuple[RequestStream, asyncio.Future]:
        """Queue an add command; the future settles once the engine thread accepted or refused it."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running (the server is shutting down)")
        stream = RequestStream(request_id, self, output_queue)
        accepted = asyncio.get_running_loop().create_future()
        self._commands.put(_AddCommand(request_id, prompt, sampling_params, client_id, stream, accepted, group,
                                       priority))
        return stream, accepted

    async def generate(
        self,
        prompt: str | list[int] | dict,
        sampling_params: SamplingParams,
        request_id: str,
        client_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its cumulative outputs; stopping early aborts it."""
        stream = await self.add_request(request_id, prompt, sampling_params, client_id, priority)
        async for output in stream:
            yield output

    async def abort(self, request_ids: str | Iterable[str]) -> None:
        self._abort_nowait([request_ids] if isinstance(request_ids, str) else list(request_ids))

    def abort_all(self) -> None:
        """Abort every request in flight; each stream still gets its final output, whose
        finish_reason is "abort" (unlike `shutdown`, which fails the streams)."""
        if self._thread is not None:
            self._commands.put(_AbortAllCommand())

    @property
    def num_live_requests(self) -> int:
        """Requests the engine thread still delivers outputs for (a snapshot, from any thread)."""
        return len(self._live_streams)

    def _abort_nowait(self, request_ids: list[str], stream: RequestStream | None = None) -> None:
        # Called from `finally` blocks of cancelled tasks, so it must not await.
        if self._thread is not None:
            self._commands.put(_AbortCommand(request_ids, stream))

    # --- the engine thread ------------------------------------------------------------------

    def _run_loop(self) -> None:
        while True:
            try:
                if not self._run_iteration():
                    return
            except Exception as error:  # noqa: BLE001 - the loop must outlive any one failure
                logger.exception("engine loop iteration failed; aborting the requests in flight")
                self._abort_everything(f"engine failure: {type(error).__name__}: {error}")

    def _run_iteration(self) -> bool:
        """Apply queued commands, then run one step if there is work; False once told to stop."""
        idle = not self.engine.has_unfinished_requests() and not self._backlog
        try:
            # Block while idle (no busy-wait); otherwise take whatever arrived during the step.
            # A resize in flight wakes the idle loop now and then to switch once it is read.
            timeout = _RESIZE_POLL_S if self.engine.resize_pending else None
            command = self._commands.get(block=idle, timeout=timeout if idle else None)
        except queue.Empty:
            command = None
        while command is not None:
            if isinstance(command, _StopCommand):
                self._abort_everything("the server is shutting down")
                self._refuse_queued_commands()
                self._publish_stats()
                return False
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                command = None
        self._admit_from_backlog()
        if self.engine.has_unfinished_requests():
            self._step_once()
        elif self.engine.resize_pending:
            self.engine.poll_weight_resize()
        self._publish_stats()
        return True

    def _admit_from_backlog(self) -> None:
        # Keep the scheduler's queue about one batch long, so whatever arrives next (a single
        # request or another group's turn) waits behind at most that much of any group.
        while self._backlog and self.engine.scheduler.num_waiting < self.engine.args.max_num_seqs:
            self.engine.enqueue_request(self._backlog.pop())

    def _publish_stats(self) -> None:
        stats = self.engine.get_stats()
        if self._backlog:
            stats = dataclasses.replace(stats, num_waiting=stats.num_waiting + len(self._backlog))
        self._latest_stats = stats

    def _apply(self, command: _AddCommand | _AbortCommand | _AbortAllCommand | _ResizeCommand) -> None:
        if isinstance(command, _ResizeCommand):
            self._start_resize(command)
            return
        if isinstance(command, _AbortAllCommand):
            # The streams stay registered: their final outputs come with the next step.
            while self._backlog:
                self.engine.enqueue_request(self._backlog.pop())
            if self._live_streams:
                self.engine.abort_request(list(self._live_streams))
            return
        if isinstance(command, _AbortCommand):
            known = [
                request_id for request_id in command.request_ids
                if request_id in self._live_streams
                and (command.stream is None or self._live_streams[request_id] is command.stream)
            ]
            for request_id in known:
                del self._live_streams[request_id]
            in_engine = [request_id for request_id in known if not self._backlog.remove(request_id)]
            if in_engine:
                self.engine.abort_request(in_engine)
            return
        if command.stream.finished:
            # Aborted before the engine ever saw it.
            self._resolve(command.accepted, None)
            return
        try:
            if command.request_id in self._backlog:
                raise ValueError(f"request id {command.request_id!r} is already in use")
            request = self.engine.prepare_request(
                command.request_id, command.prompt, command.sampling_params, client_id=command.client_id,
                priority=command.priority,
            )
            if command.group is None:
                self.engine.enqueue_request(request)
            else:
                self._backlog.push(command.group, request)
        except Exception as error:  # noqa: BLE001 - any rejection belongs to the caller
            self._resolve(command.accepted, error)
            return
        self._live_streams[command.request_id] = command.stream
        self._resolve(command.accepted, None)

    async def set_weight_memory(self, budget: str | int) -> Any:
        """Move a BitStack model to `budget` bytes between steps (requests in flight keep
        going); returns the engine's WeightMemoryInfo after the switch. A bad budget raises
        ConfigError with the valid range, changing nothing."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running (the server is shutting down)")
        done = asyncio.get_running_loop().create_future()
        self._commands.put(_ResizeCommand(budget, done))
        return await done

    def weight_memory_info(self) -> Any:
        """The BitStack model's WeightMemoryInfo (None for other formats); a snapshot."""
        return self.engine.weight_memory_info()

    def _start_resize(self, command: _ResizeCommand) -> None:
        try:
            ticket = self.engine.request_weight_memory(command.budget)
        except Exception as error:  # noqa: BLE001 - a bad budget belongs to the caller
            self._settle(command.done, None, error)
            return
        ticket.add_done_callback(lambda done: self._settle(command.done, done.info, done.error))

    def _step_once(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:  # noqa: BLE001 - one bad step must not take the server down
            logger.exception("engine step failed; aborting the requests in flight")
            self._abort_everything(f"engine step failed: {type(error).__name__}: {error}")
            return
        deliveries: list[tuple[RequestStream, RequestOutput | BaseException]] = []
        for output in outputs:
            stream = self._live_streams.get(output.request_id)
            if stream is None:
                continue  # aborted by its consumer; nobody is listening any more
            if output.finished:
                del self._live_streams[output.request_id]
            deliveries.append((stream, output))
        self._deliver(deliveries)

    def _abort_everything(self, reason: str) -> None:
        request_ids = list(self._live_streams)
        streams = list(self._live_streams.values())
        self._live_streams.clear()
        while self._backlog:
            self._backlog.pop()
        if request_ids:
            try:
                self.engine.abort_request(request_ids)
            except Exception:  # noqa: BLE001 - we are already handling a failure
                logger.exception("aborting requests after a failure also failed")
        self._deliver([(stream, EngineStepError(reason)) for stream in streams])

    def _refuse_queued_commands(self) -> None:
        # Adds that raced with the stop would otherwise wait forever for an answer.
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _AddCommand):
                self._resolve(command.accepted, EngineDeadError("the server is shutting down"))
            elif isinstance(command, _ResizeCommand):
                self._settle(command.done, None, EngineDeadError("the server is shutting down"))

    def _deliver(self, deliveries: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
        # One wake-up of the event loop per step, however many requests progressed.
        if not deliveries:
            return
        assert self._loop is not None

        def put_all() -> None:
            for stream, item in deliveries:
                stream._put(item)

        try:
            self._loop.call_soon_threadsafe(put_all)
        except RuntimeError:
            pass  # the event loop is closed: nobody left to tell

    def _resolve(self, future: asyncio.Future, error: BaseException | None) -> None:
        self._settle(future, None, error)

    def _settle(self, future: asyncio.Future, result: Any, error: BaseException | None) -> None:
        assert self._loop is not None

        def settle() -> None:
            if future.done():
                return
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

        try:
            self._loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass
