"""A thread with an asyncio loop and an etcd connection of its own, for work that must not wait
on a busy main loop: keeping a lease alive. An agent's loop also carries its guests' completions
and the data plane, an orchestrator's a hundred jobs; a lease refresh queued behind them can come
too late, and etcd then takes a busy process for a dead one.

The owner starts it, hands it coroutines (`call` from its own loop, or `submit` from anywhere),
and stops it on shutdown; `stop` joins the thread with a deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from cluster.etcd_config import EtcdConfig
from cluster.store import EtcdStore

log = logging.getLogger(__name__)
T = TypeVar("T")
START_TIMEOUT_S = 30.0


class StoreThread:
    def __init__(self, etcd: EtcdConfig, prefix: str, name: str) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._store: EtcdStore | None = None

    def start(self) -> None:
        """Starts the thread and its loop; the etcd connection is opened in it (lazily by aetcd)."""
        if self._thread is not None:
            return
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            self._store = EtcdStore(self.etcd, prefix=self.prefix)
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._close_in_loop())
                loop.close()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT_S):
            raise RuntimeError(f"thread {self.name} did not start within {START_TIMEOUT_S:.0f} s")

    async def _close_in_loop(self) -> None:
        current = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not current]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._store is not None:
            with contextlib.suppress(Exception):
                await self._store.close()

    def submit(self, work: Callable[[EtcdStore], Coroutine[Any, Any, T]]) -> concurrent.futures.Future[T]:
        """Runs `work(store)` on this thread's loop; thread-safe. Cancelling the future cancels it."""
        if self._loop is None or self._store is None:
            raise RuntimeError(f"thread {self.name} is not running")
        return asyncio.run_coroutine_threadsafe(work(self._store), self._loop)

    async def call(self, work: Callable[[EtcdStore], Coroutine[Any, Any, T]]) -> T:
        """`submit`, awaited from another loop."""
        return await asyncio.wrap_future(self.submit(work))

    def stop(self, timeout_s: float = 5.0) -> None:
        """Cancels what runs there, closes the etcd connection, joins the thread (within `timeout_s`)."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        if thread.is_alive():
            log.warning("thread %s did not stop within %.0f s", self.name, timeout_s)
        self._thread = self._loop = self._store = None
