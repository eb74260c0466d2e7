"""The one thread that runs agentrt's heavy torch work: model loading and every engine's steps.

Why one thread: torch's CPU kernels run on OpenMP, and every thread that starts a parallel
region gets its own team of worker threads. Once two teams exist on a small machine, libgomp
throttles its spin-waits and each small operator pays a slow wake-up: an engine stepping on its
own thread, after the model was loaded on the main thread, ran at half speed on 2 cores (a
32-sequence decode step took 26 ms instead of 14). Routing loading and stepping through this
thread keeps a single team, and the event loop's thread stays free.

>>> model = compute.call(load_model, path)   # runs here, blocks the caller until done  # doctest: +SKIP
"""

from __future__ import annotations

import threading
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol


class Loop(Protocol):
    def ready(self) -> bool:
        """Has work: called on the compute thread under its lock, so it must be quick."""
        ...

    def poll(self) -> None:
        """Do one unit of work (an engine: take its messages, run one step)."""
        ...


class ComputeThread:
    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._tasks: deque[tuple[Callable, tuple, dict, Future]] = deque()
        self._loops: list[Loop] = []
        self._thread: threading.Thread | None = None

    def _ensure_started(self) -> None:
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="agentrt-compute", daemon=True)
                self._thread.start()

    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run fn on the compute thread and return its result (directly if already there)."""
        if self.on_thread():
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        self._ensure_started()
        future: Future = Future()
        with self._cv:
            self._tasks.append((fn, args, kwargs, future))
            self._cv.notify()
        return future

    def add_loop(self, loop: Loop) -> None:
        self._ensure_started()
        with self._cv:
            self._loops.append(loop)
            self._cv.notify()

    def remove_loop(self, loop: Loop) -> None:
        with self._cv:
            if loop in self._loops:
                self._loops.remove(loop)

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _run(self) -> None:
        while True:
            self._once()

    def _once(self) -> None:
        # One task and one poll of each ready loop. A method of its own so that its locals (the
        # last task's function and arguments, the loops) die when it returns: held across the wait
        # for the next task, they would keep a closed engine and its pools alive.
        with self._cv:
            while not self._tasks and not any(loop.ready() for loop in self._loops):
                self._cv.wait()
            task = self._tasks.popleft() if self._tasks else None
            loops = [loop for loop in self._loops if loop.ready()]
        if task is not None:
            fn, args, kwargs, future = task
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:  # handed to the caller
                    future.set_exception(e)
        for loop in loops:
            try:
                loop.poll()
            except Exception:  # a loop's own bug must not stop the thread every engine shares
                traceback.print_exc()


compute = ComputeThread()
