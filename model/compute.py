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

import atexit
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
        self._closed = False

    def _ensure_started(self) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("agentrt's compute thread has shut down (the interpreter is exiting); "
                                   "no model work can start now")
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

    def close(self, timeout: float = 60.0) -> None:
        """Finish the step in progress, then stop the thread; tasks still queued fail. Runs at
        interpreter exit (atexit): a daemon thread still inside torch when the interpreter
        finalizes is killed mid-C++ (freeing a tensor, say) and the process aborts with
        "terminate called without an active exception"."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while not self._closed:
            self._once()
        with self._cv:
            tasks, self._tasks = list(self._tasks), deque()
        for *_, future in tasks:
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("agentrt's compute thread shut down before running this task"))

    def _once(self) -> None:
        # One task and one poll of each ready loop. A method of its own so that its locals (the
        # last task's function and arguments, the loops) die when it returns: held across the wait
        # for the next task, they would keep a closed engine and its pools alive.
        with self._cv:
            while not self._closed and not self._tasks and not any(loop.ready() for loop in self._loops):
                self._cv.wait()
            if self._closed:
                return
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
atexit.register(compute.close)
