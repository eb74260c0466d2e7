"""The dashboard's table of agents: updates changed cells in place, never clears and refills."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from ..data import AgentRow, one_line

COLUMNS = [("name", "agent", 14), ("status", "state", 9), ("turn", "turn", 4), ("tokens", "tokens", 7),
           ("rate", "tok/s", 6), ("think", "thinking budget", 18), ("tools", "tools", 5),
           ("reward", "reward", 6), ("last", "last action", 30)]
STATUS_STYLE = {"running": "bold green", "waiting": "dim", "done": "cyan", "failed": "bold red",
                "timeout": "red", "budget": "yellow", "max_turns": "yellow", "cancelled": "magenta",
                "interrupted": "red"}


def think_bar(used: int, budget: int | None, width: int = 8) -> Text:
    """A text bar of thinking tokens used out of the budget (no budget: just the count)."""
    if not budget:
        return Text(f"{used} / -", style="dim")
    frac = min(1.0, used / budget)
    full = round(frac * width)
    style = "red" if frac >= 0.9 else "yellow" if frac >= 0.6 else "green"
    return Text.assemble(("█" * full, style), ("░" * (width - full), "dim"), f" {used}/{budget}")


def cells(row: AgentRow) -> dict[str, object]:
    return {
        "name": row.name,
        "status": Text(row.status, style=STATUS_STYLE.get(row.status, "")),
        "turn": str(row.turn),
        "tokens": str(row.tokens),
        "rate": "-" if row.tokens_per_s is None else f"{row.tokens_per_s:.1f}",
        "think": think_bar(row.think_used, row.think_budget),
        "tools": str(row.tool_calls),
        "reward": "-" if row.reward is None else f"{row.reward:g}",
        "last": one_line(row.last_action, 40),
    }


class AgentTable(DataTable):
    """One row per agent, keyed by trajectory id."""

    DEFAULT_CSS = """
    AgentTable { height: 1fr; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self._shown: dict[str, AgentRow] = {}

    def on_mount(self) -> None:
        for key, label, width in COLUMNS:
            self.add_column(label, key=key, width=width)

    def show(self, rows: list[AgentRow]) -> int:
        """Make the table show `rows` (in order of first appearance): add new rows, remove gone
        ones, update the cells that changed. Returns the number of cells written."""
        written = 0
        wanted = {r.trajectory_id: r for r in rows}
        for tid in [t for t in self._shown if t not in wanted]:
            self.remove_row(tid)
            del self._shown[tid]
        for tid, row in wanted.items():
            old = self._shown.get(tid)
            if old is None:
                self.add_row(*cells(row).values(), key=tid)
                written += len(COLUMNS)
            elif old != row:
                new, before = cells(row), cells(old)
                for key, value in new.items():
                    if value != before[key]:
                        self.update_cell(tid, key, value)
                        written += 1
            self._shown[tid] = row
        order, have = list(wanted), [k.value for k in self.rows]
        if have != order:  # rows shown again after a filter went at the end: put the tail back in order
            cursor = self.current_trajectory
            i = next(i for i, (a, b) in enumerate(zip(have, order)) if a != b)
            for tid in have[i:]:
                self.remove_row(tid)
            for tid in order[i:]:
                self.add_row(*cells(wanted[tid]).values(), key=tid)
            if cursor in wanted:
                self.move_cursor(row=self.get_row_index(cursor))
        return written

    @property
    def current_trajectory(self) -> str | None:
        if not self.row_count:
            return None
        key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        return key.value
