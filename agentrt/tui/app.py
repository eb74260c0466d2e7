"""The Textual app. `make_app(source)` is the one factory the CLI and the tests use.

The app polls `source.snapshot()` on a timer (`refresh_hz`, a few times a second) in a named,
exclusive worker group; the worker posts a `SnapshotReady` message and the screens update the cells
that changed. Nothing is pushed per token.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from textual.app import App
from textual.binding import Binding
from textual.css.query import NoMatches

from .data import Snapshot
from .messages import SnapshotReady, SourceError
from .screens.agent import AgentScreen
from .screens.dashboard import DashboardScreen
from .screens.help import HelpScreen
from .screens.replay import ReplayScreen


class AgentrtApp(App):
    TITLE = "agentrt"
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("r", "replay", "Runs/replay"),
        Binding("d", "dashboard", "Dashboard"),
    ]

    def __init__(self, source: Any, *, refresh_hz: float = 3.0, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        if refresh_hz <= 0:
            raise ValueError(f"refresh_hz={refresh_hz} must be > 0")
        self.source, self.refresh_hz, self.clock = source, refresh_hz, clock
        self.snapshot: Snapshot | None = None
        self.polls = 0  # snapshots received
        self.last_error: str | None = None
        self._polling = False

    def on_mount(self) -> None:
        self.push_screen(DashboardScreen())
        self.poll()
        self.set_interval(1 / self.refresh_hz, self.poll, name="snapshot-poll")

    # -- polling
    def poll(self) -> None:
        """Start one snapshot poll unless one is still running (a slow database never piles up)."""
        if self._polling:
            return
        self._polling = True
        source = self.source
        if getattr(source, "blocking", False):
            def fetch() -> None:
                self._post(source.snapshot)
            self.run_worker(fetch, thread=True, group="snapshot", exclusive=True, name="snapshot", exit_on_error=False)
        else:
            async def afetch() -> None:
                self._post(source.snapshot)
            self.run_worker(afetch, group="snapshot", exclusive=True, name="snapshot", exit_on_error=False)

    def _post(self, take: Callable[[], Snapshot]) -> None:
        try:
            self.post_message(SnapshotReady(take()))
        except Exception as e:  # shown in the status line; the next tick tries again
            self.post_message(SourceError(f"{type(e).__name__}: {e}"))

    def on_snapshot_ready(self, message: SnapshotReady) -> None:
        self._polling = False
        self.snapshot, self.last_error = message.snapshot, None
        self.polls += 1
        for screen in self.screen_stack:
            apply = getattr(screen, "apply_snapshot", None)
            if apply is not None:
                try:
                    apply(message.snapshot)
                except NoMatches:  # pushed but not composed yet: its on_mount applies app.snapshot
                    pass

    def on_source_error(self, message: SourceError) -> None:
        self._polling = False
        if message.error != self.last_error:
            self.last_error = message.error
            self.notify(message.error, title="polling failed", severity="error", timeout=4)

    # -- navigation
    def open_agent(self, trajectory_id: str) -> None:
        self.push_screen(AgentScreen(trajectory_id))

    def _to_dashboard(self) -> None:
        while len(self.screen_stack) > 2:  # the default screen, then the dashboard
            self.pop_screen()

    def action_dashboard(self) -> None:
        self._to_dashboard()

    def action_replay(self) -> None:
        if not hasattr(self.source, "runs"):
            self.notify("runs and replay need a store: agentrt watch <store>", severity="warning", timeout=3)
            return
        if isinstance(self.screen, ReplayScreen):
            return
        self._to_dashboard()
        self.push_screen(ReplayScreen())

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            self.pop_screen()
        else:
            self.push_screen(HelpScreen(self.screen))


def make_app(source: Any, *, refresh_hz: float = 3.0, clock: Callable[[], float] = time.time) -> AgentrtApp:
    """The TUI over `source` (a `RuntimeSource` or a `StoreSource`): polls it `refresh_hz` times a
    second; `clock` stamps snapshots (tests freeze it)."""
    if hasattr(source, "clock"):
        source.clock = clock
    return AgentrtApp(source, refresh_hz=refresh_hz, clock=clock)
