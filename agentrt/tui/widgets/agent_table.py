"""The dashboard's table of agents, drawn with the Line API: a snapshot stores the rows and repaints the
visible lines only, never clears and refills."""

from __future__ import annotations

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from ..data import AgentRow, one_line

COLUMNS = [("name", "agent", 14), ("status", "state", 9), ("turn", "turn", 4), ("tokens", "tokens", 7),
           ("rate", "tok/s", 6), ("think", "thinking budget", 18), ("tools", "tools", 5),
           ("reward", "reward", 6), ("last", "last action", 30)]
TABLE_WIDTH = sum(w + 2 for _, _, w in COLUMNS)
HEADER_CELLS = [label for _, label, _ in COLUMNS]
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


class AgentTable(ScrollView, can_focus=True):
    """One row per agent, drawn with the Line API: `show(rows)` only stores the rows and asks for a
    repaint; `render_line` draws the visible lines (a sticky header, then the rows), so the cost of a
    snapshot is proportional to what is on screen, not to the number of agents."""

    BINDINGS = [
        Binding("up", "cursor_up", "Up", show=False),
        Binding("down", "cursor_down", "Down", show=False),
        Binding("pageup", "page_up", "Page up", show=False),
        Binding("pagedown", "page_down", "Page down", show=False),
        Binding("home", "first", "First", show=False),
        Binding("end", "last", "Last", show=False),
        Binding("enter", "select_cursor", "Select", show=False),
    ]
    COMPONENT_CLASSES = {"agent-table--header", "agent-table--cursor", "agent-table--even-row"}
    DEFAULT_CSS = """
    AgentTable {
        height: 1fr;
        background: $surface;
        color: $foreground;
        &:focus {
            background-tint: $foreground 5%;
            & > .agent-table--cursor {
                background: $block-cursor-background;
                color: $block-cursor-foreground;
                text-style: $block-cursor-text-style;
            }
            & > .agent-table--header { background-tint: $foreground 5%; }
        }
        &:dark > .agent-table--even-row { background: $surface-darken-1 40%; }
        & > .agent-table--header { text-style: bold; background: $panel; color: $foreground; }
        &:ansi > .agent-table--header { background: ansi_bright_blue; color: ansi_default; }
        & > .agent-table--even-row { background: $surface-lighten-1 50%; }
        & > .agent-table--cursor {
            background: $block-cursor-blurred-background;
            color: $block-cursor-blurred-foreground;
            text-style: $block-cursor-blurred-text-style;
        }
    }
    """

    cursor_row: reactive[int] = reactive(0, always_update=False, init=False)

    class RowSelected(Message):
        """A row was chosen: Enter, or a click on the cursor row."""

        def __init__(self, table: "AgentTable", trajectory_id: str) -> None:
            super().__init__()
            self.table, self.trajectory_id = table, trajectory_id

        @property
        def control(self) -> "AgentTable":
            return self.table

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.shown_rows: list[AgentRow] = []
        self._index: dict[str, int] = {}
        self._lines: dict[tuple, Strip] = {}  # (row, kind, style key) -> the row's full-width strip

    # -- data
    def show(self, rows: list[AgentRow]) -> int:
        """Make the table show `rows`, in their order; the cursor stays on its agent while it is shown.
        Returns the number of rows added, removed or changed (0: nothing to repaint)."""
        old = self.shown_rows
        if rows == old:
            return 0
        changed = abs(len(rows) - len(old)) + sum(1 for a, b in zip(rows, old) if a != b)
        current = self.current_trajectory
        self.shown_rows = list(rows)
        self._index = {r.trajectory_id: i for i, r in enumerate(self.shown_rows)}
        self._set_virtual_size()
        if len(self._lines) > 4 * max(len(rows), 64):
            self._lines.clear()
        if current is not None and current in self._index:
            self._move_cursor(self._index[current])
        else:
            self._move_cursor(self.cursor_row)
        self.refresh()
        return changed

    @property
    def row_count(self) -> int:
        return len(self.shown_rows)

    @property
    def current_trajectory(self) -> str | None:
        if not self.shown_rows:
            return None
        return self.shown_rows[min(self.cursor_row, len(self.shown_rows) - 1)].trajectory_id

    # -- cursor
    def _set_virtual_size(self) -> None:
        size = Size(TABLE_WIDTH, len(self.shown_rows) + 1)
        if self.virtual_size != size:
            self.virtual_size = size

    def _visible_rows(self) -> int:
        return max(1, self.scrollable_content_region.height - 1)

    def _move_cursor(self, row: int) -> None:
        row = max(0, min(row, len(self.shown_rows) - 1)) if self.shown_rows else 0
        self.cursor_row = row
        self._scroll_to_cursor()

    def _scroll_to_cursor(self) -> None:
        top, seen = int(self.scroll_y), self._visible_rows()
        if self.cursor_row < top:
            self.scroll_to(y=self.cursor_row, animate=False, immediate=True)
        elif self.cursor_row >= top + seen:
            self.scroll_to(y=self.cursor_row - seen + 1, animate=False, immediate=True)

    def watch_cursor_row(self, old: int, new: int) -> None:
        self.refresh()

    def action_cursor_up(self) -> None:
        self._move_cursor(self.cursor_row - 1)

    def action_cursor_down(self) -> None:
        self._move_cursor(self.cursor_row + 1)

    def action_page_up(self) -> None:
        self._move_cursor(self.cursor_row - self._visible_rows())

    def action_page_down(self) -> None:
        self._move_cursor(self.cursor_row + self._visible_rows())

    def action_first(self) -> None:
        self._move_cursor(0)

    def action_last(self) -> None:
        self._move_cursor(len(self.shown_rows) - 1)

    def action_select_cursor(self) -> None:
        tid = self.current_trajectory
        if tid is not None:
            self.post_message(self.RowSelected(self, tid))

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None or offset.y == 0:  # a scrollbar or the header
            return
        row = int(self.scroll_y) + offset.y - 1
        if not 0 <= row < len(self.shown_rows):
            return
        event.stop()
        if row == self.cursor_row:
            self.post_message(self.RowSelected(self, self.shown_rows[row].trajectory_id))
        else:
            self._move_cursor(row)

    # -- drawing
    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        scroll_x, scroll_y = (int(v) for v in self.scroll_offset)
        base = self.rich_style
        if y == 0:
            key = (None, "header", base)
            strip = self._lines.get(key)
            if strip is None:
                strip = self._strip(HEADER_CELLS, base + self.get_component_styles("agent-table--header").rich_style)
                self._lines[key] = strip
        else:
            index = scroll_y + y - 1
            if not 0 <= index < len(self.shown_rows):
                return Strip.blank(width, base)
            row = self.shown_rows[index]
            if index == self.cursor_row:
                kind, over = "cursor", self.get_component_rich_style("agent-table--cursor")
                style, post = base, over
            elif index % 2 == 0:  # zebra stripes as a DataTable draws them: rows 0, 2, 4...
                kind, style, post = "even", base + self.get_component_styles("agent-table--even-row").rich_style, None
            else:
                kind, style, post = "odd", base, None
            key = (row, kind, style, post)
            strip = self._lines.get(key)
            if strip is None:
                strip = self._strip(list(cells(row).values()), style, post)
                self._lines[key] = strip
        return strip.crop_extend(scroll_x, scroll_x + width, base)

    def _strip(self, values: list[object], style: Style, post: Style | None = None) -> Strip:
        line = Text(no_wrap=True, end="")
        for value, (_, _, w) in zip(values, COLUMNS):
            text = value.copy() if isinstance(value, Text) else Text(str(value))
            text.truncate(w, overflow="ellipsis", pad=True)
            line.append(" ")
            line.append_text(text)
            line.append(" ")
        segments = list(Segment.apply_style(line.render(self.app.console), style, post))
        return Strip(segments, TABLE_WIDTH).simplify()

    def on_resize(self) -> None:
        self._scroll_to_cursor()
