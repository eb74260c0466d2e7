"""The run dashboard: one row per agent, the engine panel, run progress."""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Input, ProgressBar, Static

from ..data import Snapshot
from ..widgets.agent_table import AgentTable
from ..widgets.engine_panel import EnginePanel


class DashboardScreen(Screen):
    CSS_PATH = "dashboard.tcss"
    BINDINGS = [
        Binding("enter", "open_agent", "Agent view", show=True),
        Binding("slash", "filter", "Filter", key_display="/"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def __init__(self) -> None:
        super().__init__(name="dashboard")
        self.filter_text = ""
        self.snapshot: Snapshot | None = None
        self._last_tokens: tuple[float, int] | None = None

    def compose(self) -> ComposeResult:
        yield Static("waiting for the first snapshot…", id="run-line")
        with Horizontal(id="main"):
            yield AgentTable(id="agents")
            yield EnginePanel(id="engine")
        yield ProgressBar(total=None, show_eta=False, id="progress")
        yield Input(placeholder="filter agents by name, state or last action (Enter: apply, Esc: clear)",
                    id="filter")
        yield Footer()

    def on_mount(self) -> None:
        box = self.query_one("#filter", Input)
        box.display, box.cursor_blink = False, False  # no blink: stable screenshots
        self.query_one(AgentTable).focus()
        if self.app.snapshot is not None:
            self.apply_snapshot(self.app.snapshot)

    # -- data
    def apply_snapshot(self, snap: Snapshot) -> None:
        self.snapshot = snap
        rows = snap.agents
        if self.filter_text:
            needle = self.filter_text.lower()
            rows = [r for r in rows if needle in r.name.lower() or needle in r.status.lower()
                    or needle in r.last_action.lower()]
        self.query_one(AgentTable).show(rows)
        tokens = sum(r.tokens for r in snap.agents)
        rate = None
        if self._last_tokens is not None and snap.taken_at > self._last_tokens[0]:
            rate = (tokens - self._last_tokens[1]) / (snap.taken_at - self._last_tokens[0])
        self._last_tokens = (snap.taken_at, tokens)
        self.query_one(EnginePanel).show(snap.engine, rate)
        bar = self.query_one(ProgressBar)
        bar.update(total=max(snap.total, 1), progress=snap.done)
        stamp = time.strftime("%H:%M:%S", time.gmtime(snap.taken_at))
        shown = f"  showing {len(rows)} (filter: {self.filter_text!r})" if self.filter_text else ""
        self.query_one("#run-line", Static).update(
            f"run [b]{snap.run_id or '-'}[/b]   agents {snap.total}   finished {snap.done}/{snap.total}   "
            f"tokens {tokens}   at {stamp} UTC{shown}")

    # -- actions
    def action_open_agent(self) -> None:
        tid = self.query_one(AgentTable).current_trajectory
        if tid is not None:
            self.app.open_agent(tid)

    def on_agent_table_row_selected(self, event: AgentTable.RowSelected) -> None:
        event.stop()
        self.app.open_agent(event.trajectory_id)

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value, box.display = "", False
        self._set_filter("")
        self.query_one(AgentTable).focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        self._set_filter(event.value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one(AgentTable).focus()

    def _set_filter(self, text: str) -> None:
        self.filter_text = text.strip()
        if self.snapshot is not None:
            self.apply_snapshot(self.snapshot)
