"""Handle and the FIFO worker threads behind asynchronous communication.

A multi-stage compressed collective (compress -> all-to-all -> decompress-and-sum ->
re-compress -> all-gather -> decompress) cannot be one ``async_op=True`` torch call, so
each Communicator runs its collectives on one worker thread, in submission order: as
long as every rank issues collectives in the same order, they stay matched across ranks
while the caller (e.g. backward) keeps computing. Point-to-point sends and receives run
on two further workers so that a receive waiting for its peer never holds up a send
(1F1B pipelines send and receive at the same time).
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as _FutureTimeout
from typing import Any, Callable


class Handle:
    """The result of an ``async_op=True`` call: ``wait()`` returns it (or raises its error)."""

    def __init__(self, future: Future, what: str, timeout_s: float | None, on_wait: Callable[[float], None] | None = None):
        self._future, self._what, self._timeout_s = future, what, timeout_s
        self._on_wait = on_wait

    def wait(self, timeout: float | None = None, exposed: bool = True) -> Any:
        """The result (or the operation's error; TimeoutError after the timeout). ``exposed``:
        count the time blocked here as exposed communication (False for a background thread
        that waits on behalf of the compute thread, which counts its own wait)."""
        limit = self._timeout_s if timeout is None else timeout
        t0 = time.perf_counter()
        try:
            return self._future.result(timeout=limit)
        except _FutureTimeout:
            raise TimeoutError(
                f"{self._what} did not complete within {limit:g} s (a dead or stalled peer?)"
            ) from None
        finally:
            if self._on_wait is not None and exposed:  # time the caller was blocked: *exposed* communication
                self._on_wait(time.perf_counter() - t0)

    def is_completed(self) -> bool:
        return self._future.done()

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` once the operation has finished (at once if it has), on whichever
        thread finishes it: e.g. to complete a ``torch.futures.Future`` for a DDP comm hook."""
        self._future.add_done_callback(lambda _: fn())

    def __repr__(self) -> str:
        return f"Handle({self._what}, done={self.is_completed()})"


class Worker:
    """One daemon thread running submitted callables strictly in FIFO order.

    A daemon thread (not a ThreadPoolExecutor) so that a receive blocked on a dead peer
    never keeps the interpreter from exiting; the process group's own timeout still
    turns such a receive into an error.
    """

    def __init__(self, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any]) -> Future:
        if self._closed:
            raise RuntimeError(f"{self._thread.name}: the communicator is closed")
        fut: Future = Future()
        self._queue.put((fn, fut))
        return fut

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # delivered to whoever waits on the handle
                fut.set_exception(e)

    def close(self, timeout: float | None = None) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout)
