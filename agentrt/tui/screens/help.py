"""`?`: the keys of the screen below and of the app."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


def key_lines(bindings) -> list[str]:
    out = []
    for b in bindings:
        b = b if isinstance(b, Binding) else Binding(*b)
        out.append(f"  {b.key_display or b.key:<12} {b.description}")
    return out


class HelpScreen(ModalScreen):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 64; height: auto; max-height: 80%; border: thick $accent;
                                  background: $surface; padding: 1 2; }
    """
    BINDINGS = [Binding("escape", "close", "Close"), Binding("question_mark", "close", "Close", key_display="?"),
                Binding("q", "close", "Close", show=False)]

    def __init__(self, below) -> None:
        super().__init__(name="help")
        self.below = below

    def compose(self) -> ComposeResult:
        lines = [f"[b]keys: {type(self.below).__name__.removesuffix('Screen').lower()}[/b]",
                 *key_lines(getattr(self.below, "BINDINGS", [])), "", "[b]everywhere[/b]",
                 *key_lines(self.app.BINDINGS), "", "mouse: click a row to focus it, click again to open it",
                 "", "[dim]Esc or ? closes this help[/dim]"]
        with VerticalScroll():
            yield Static("\n".join(lines).replace("[/b]\n", "[/b]\n"), markup=True, id="help-text")

    def action_close(self) -> None:
        self.app.pop_screen()
