"""One agent: its transcript as it streams, and its budget use."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Static

from ..data import AgentRow, Snapshot
from ..messages import TranscriptReady
from ..widgets.agent_table import STATUS_STYLE, think_bar
from ..widgets.transcript import Transcript


class AgentScreen(Screen):
    CSS_PATH = "agent.tcss"
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("backspace", "back", "Back", show=False),
        Binding("f", "toggle_follow", "Follow"),
    ]

    def __init__(self, trajectory_id: str) -> None:
        super().__init__(name=f"agent:{trajectory_id}")
        self.trajectory_id = trajectory_id
        self.entries: list[dict] = []

    def compose(self) -> ComposeResult:
        yield Static("", id="agent-head")
        yield Transcript(id="transcript")
        yield Footer()

    def on_mount(self) -> None:
        if self.app.snapshot is not None:
            self.apply_snapshot(self.app.snapshot)
        self.poll()
        self.set_interval(1 / self.app.refresh_hz, self.poll, name="transcript-poll")
        self.query_one(Transcript).focus()

    def poll(self) -> None:
        source = self.app.source
        tid = self.trajectory_id
        if getattr(source, "blocking", False):
            def fetch() -> None:
                self.post_message(TranscriptReady(tid, source.transcript(tid)))
            self.run_worker(fetch, thread=True, group="transcript", exclusive=True, name="transcript",
                            exit_on_error=False)
        else:
            async def afetch() -> None:
                self.post_message(TranscriptReady(tid, source.transcript(tid)))
            self.run_worker(afetch, group="transcript", exclusive=True, name="transcript", exit_on_error=False)

    def on_transcript_ready(self, message: TranscriptReady) -> None:
        if message.trajectory_id == self.trajectory_id and message.entries != self.entries:
            self.entries = message.entries
            self.query_one(Transcript).show(message.entries)

    def apply_snapshot(self, snap: Snapshot) -> None:
        row = next((r for r in snap.agents if r.trajectory_id == self.trajectory_id), None)
        if row is not None:
            self.query_one("#agent-head", Static).update(head(row))

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_toggle_follow(self) -> None:
        t = self.query_one(Transcript)
        t.follow = not t.follow
        self.notify(f"follow {'on' if t.follow else 'off'}", timeout=1.5)


def head(row: AgentRow) -> Text:
    return Text.assemble(
        (row.name, "bold"), "  ", (row.status, STATUS_STYLE.get(row.status, "")),
        f"   turn {row.turn}   tokens {row.tokens}   tools {row.tool_calls}   reward ",
        "-" if row.reward is None else f"{row.reward:g}", "   thinking ", think_bar(row.think_used, row.think_budget),
        ("\n" + row.last_action, "dim"))
