"""A transcript: one block per message, reasoning set apart, tool calls with their arguments,
errors highlighted. New entries are appended as they arrive (streaming), old ones left alone."""

from __future__ import annotations

from rich.console import Group
from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Static

ROLE_STYLE = {"system": "bold magenta", "user": "bold blue", "assistant": "bold green", "tool": "bold yellow",
              "end": "bold"}


def render_entry(e: dict, *, current: bool = False, branches: list[dict] | None = None) -> Group:
    head = Text.assemble((f"#{e['step']} ", "dim"), (e["role"], ROLE_STYLE.get(e["role"], "bold")))
    if e["role"] == "tool":
        head.append(f" {e['tool_name'] or '?'} ({e['tool_call_id']})", style="yellow")
        head.append(f"  ERROR {e['error']}" if e["error"] else "  ok", style="bold white on red" if e["error"] else "green")
    elif e["error"]:
        head.append(f"  ERROR {e['error'].strip().splitlines()[-1]}", style="bold white on red")
    if e["shared"]:
        head.append("  [shared prefix]", style="dim italic")
    if current:
        head.append("  ◀ step", style="reverse")
    parts: list = [head]
    if e["reasoning"]:
        parts.append(Text("  ┊ " + e["reasoning"].replace("\n", "\n  ┊ "), style="italic dim"))
    if e["content"]:
        style = "red" if e["error"] else ""
        parts.append(Text("  " + e["content"].replace("\n", "\n  "), style=style))
    for c in e["tool_calls"]:
        parts.append(Text.assemble("  → ", (f"{c['name']}", "bold cyan"), f"({c['arguments']})", (f"  {c['id']}", "dim")))
    for b in branches or []:
        parts.append(Text(f"  ⑂ branch: node {b['node_id']} of {b['agent']} ({b['trajectory_id'][:8]})",
                          style="bold magenta"))
    return Group(*parts)


class Transcript(VerticalScroll):
    """Shows transcript entries; `show(entries)` appends the new ones and redraws only changed ones."""

    DEFAULT_CSS = """
    Transcript { height: 1fr; border: round $primary; padding: 0 1; }
    Transcript > .entry { margin-bottom: 1; height: auto; }
    Transcript > .entry.-current { background: $boost; }
    Transcript > .entry.-error { border-left: thick $error; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.entries: list[dict] = []
        self.current: int | None = None
        self.branches: dict[int, list[dict]] = {}
        self.follow = True
        self._widgets: list[Static] = []

    def _static(self, i: int) -> Static:
        return self._widgets[i]

    def _renderable(self, i: int) -> Group:
        e = self.entries[i]
        return render_entry(e, current=i == self.current, branches=self.branches.get(e["node_id"]))

    def show(self, entries: list[dict], branches: dict[int, list[dict]] | None = None) -> None:
        if branches is not None:
            self.branches = branches
        old = self.entries
        if len(entries) < len(old) or (old and entries[:1] != old[:1]):
            self.remove_children()  # another trajectory: start over
            self._widgets, old = [], []
        self.entries = list(entries)
        new = []
        for i, e in enumerate(entries):
            if i < len(old):
                if e != old[i]:
                    self._static(i).update(self._renderable(i))
            else:
                new.append(Static(self._renderable(i), classes="entry -error" if e["error"] else "entry"))
        self._widgets.extend(new)
        if new:
            self.mount_all(new)
            if self.follow and self.current is None:
                self.call_after_refresh(self.scroll_end, animate=False)

    def set_current(self, index: int | None) -> None:
        prev, self.current = self.current, index
        for i in {prev, index} - {None}:
            if i < len(self.entries):
                w = self._static(i)
                w.update(self._renderable(i))
                w.set_class(i == index, "-current")
        if index is not None and index < len(self.entries):
            self.call_after_refresh(lambda: self.scroll_to_widget(self._static(index), animate=False, top=True))
