"""Runs browser and replay: pick a run and a trajectory, step through it, jump to tool calls and
errors, see where it forks, follow a branch, search."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Static

from ..data import one_line
from ..widgets.transcript import Transcript


class ReplayScreen(Screen):
    CSS_PATH = "replay.tcss"
    BINDINGS = [
        Binding("j", "step(1)", "Next step"),
        Binding("k", "step(-1)", "Prev step"),
        Binding("n", "step(1)", "Next", show=False),
        Binding("p", "step(-1)", "Prev", show=False),
        Binding("t", "jump('tool')", "Next tool call"),
        Binding("e", "jump('error')", "Next error"),
        Binding("g", "first", "First", show=False),
        Binding("G", "last", "Last", show=False),
        Binding("b", "branch", "Follow branch"),
        Binding("slash", "search", "Search", key_display="/"),
        Binding("escape", "back", "Back"),
    ]

    def __init__(self) -> None:
        super().__init__(name="replay")
        self.run_id: str | None = None
        self.trajectory_id: str | None = None
        self.entries: list[dict] = []
        self.branches: dict[int, list[dict]] = {}
        self.step = 0
        self.matches: set[str] | None = None

    def compose(self) -> ComposeResult:
        with Horizontal():
            with Vertical(id="left"):
                yield DataTable(id="runs", cursor_type="row")
                yield DataTable(id="trajectories", cursor_type="row")
            with Vertical(id="right"):
                yield Static("", id="step-info")
                yield Transcript(id="replay-transcript")
        yield Input(placeholder="search agent names, tasks and message text (Enter: apply, empty: all)",
                    id="search")
        yield Footer()

    @property
    def source(self):
        return self.app.source

    def on_mount(self) -> None:
        box = self.query_one("#search", Input)
        box.display, box.cursor_blink = False, False  # no blink: stable screenshots
        runs = self.query_one("#runs", DataTable)
        runs.border_title = "runs"
        runs.add_columns("run", "status", "agents")
        trajs = self.query_one("#trajectories", DataTable)
        trajs.border_title = "trajectories"
        trajs.add_column("agent", key="agent")
        trajs.add_column("status", key="status")
        trajs.add_column("fork", key="fork")
        self.query_one(Transcript).follow = False
        all_runs = self.source.runs()
        for r in all_runs:
            runs.add_row(one_line(r.id, 16), r.status, str((r.meta or {}).get("agents", "?")), key=r.id)
        current = self.source.current_run()
        if current is not None and current in {r.id for r in all_runs}:
            runs.move_cursor(row=runs.get_row_index(current))
            self.load_run(current)
        trajs.focus()

    # -- loading
    def load_run(self, run_id: str) -> None:
        if run_id == self.run_id:
            return
        self.run_id = run_id
        self._fill_trajectories()

    def _fill_trajectories(self) -> None:
        trajs = self.query_one("#trajectories", DataTable)
        trajs.clear()  # a different run or search: a new list, not an update of the same rows
        found = [t for t in self.source.trajectories(self.run_id) if self.matches is None or t.id in self.matches]
        for t in found:
            fork = f"fork@{t.fork_node_id}" if t.parent_trajectory_id else ""
            trajs.add_row(t.agent, t.status, fork, key=t.id)
        if found:
            self.load_trajectory(found[0].id)
        else:
            self.trajectory_id, self.entries = None, []
            self.query_one(Transcript).show([])
            self._show_step()

    def load_trajectory(self, trajectory_id: str) -> None:
        if trajectory_id == self.trajectory_id:
            return
        self.trajectory_id = trajectory_id
        self.entries = self.source.transcript(trajectory_id)
        self.branches = self.source.tree(trajectory_id)
        self.step = 0
        t = self.query_one(Transcript)
        t.current = 0
        t.show(self.entries, self.branches)
        t.set_current(0)
        self._show_step()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is None or event.row_key.value is None:
            return
        if event.data_table.id == "runs":
            self.load_run(event.row_key.value)
        elif event.data_table.id == "trajectories":
            self.load_trajectory(event.row_key.value)

    # -- stepping
    def _show_step(self) -> None:
        info = self.query_one("#step-info", Static)
        if not self.entries:
            info.update("no trajectory")
            return
        e = self.entries[self.step]
        text = Text.assemble(("step ", "dim"), (f"{self.step + 1}/{len(self.entries)}", "bold"), "  ",
                             (e["role"], "bold"))
        if e["tool_calls"]:
            text.append("  calls " + ", ".join(str(c["name"]) for c in e["tool_calls"]), style="cyan")
        if e["error"]:
            text.append("  error", style="bold white on red")
        forks = self.branches.get(e["node_id"]) if e["node_id"] is not None else None
        if forks:
            text.append(f"  ⑂ {len(forks)} branch(es) here: b to follow", style="bold magenta")
        info.update(text)

    def go(self, index: int) -> None:
        if not self.entries:
            return
        self.step = max(0, min(len(self.entries) - 1, index))
        self.query_one(Transcript).set_current(self.step)
        self._show_step()

    def action_step(self, delta: int) -> None:
        self.go(self.step + delta)

    def action_first(self) -> None:
        self.go(0)

    def action_last(self) -> None:
        self.go(len(self.entries) - 1)

    def action_jump(self, kind: str) -> None:
        """Go to the next step with a tool call (`tool`) or an error (`error`), wrapping around."""
        n = len(self.entries)
        for k in range(1, n + 1):
            e = self.entries[(self.step + k) % n]
            if (kind == "tool" and e["tool_calls"]) or (kind == "error" and e["error"]):
                self.go((self.step + k) % n)
                return
        self.notify(f"no {'tool call' if kind == 'tool' else 'error'} in this trajectory", timeout=2)

    def action_branch(self) -> None:
        if not self.entries:
            return
        forks = self.branches.get(self.entries[self.step]["node_id"])
        if not forks:
            self.notify("no branch at this step", timeout=2)
            return
        target = forks[0]["trajectory_id"]
        t = next((t for t in self.source.trajectories() if t.id == target), None)
        if t is None:
            return
        if t.run_id != self.run_id:
            runs = self.query_one("#runs", DataTable)
            runs.move_cursor(row=runs.get_row_index(t.run_id))
            self.matches = None
            self.load_run(t.run_id)
        trajs = self.query_one("#trajectories", DataTable)
        trajs.move_cursor(row=trajs.get_row_index(target))
        self.load_trajectory(target)

    # -- search
    def action_search(self) -> None:
        box = self.query_one("#search", Input)
        box.display = True
        box.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        text = event.value.strip()
        self.matches = self.source.search(text, self.run_id) if text else None
        self.trajectory_id = None
        self._fill_trajectories()
        event.input.display = bool(text)
        self.query_one("#trajectories", DataTable).focus()

    def action_back(self) -> None:
        box = self.query_one("#search", Input)
        if box.has_focus:
            box.value, box.display = "", False
            self.query_one("#trajectories", DataTable).focus()
            return
        self.app.pop_screen()
