"""The engine panel: throughput (with a sparkline), batch, queue, prefix hit rate, pool use."""

from __future__ import annotations

from collections import deque

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Sparkline, Static

from ..data import EngineInfo

HISTORY = 60


def _pool(used: int | None, total: int | None) -> str:
    if used is None or not total:
        return "-"
    return f"{used}/{total} ({100 * used / total:.0f}%)"


def _num(value: float | int | None, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


class EnginePanel(Vertical):
    """Shows an `EngineInfo`; without one (a store source) only the run's token rate is plotted."""

    DEFAULT_CSS = """
    EnginePanel { width: 34; height: auto; border: round $accent; padding: 0 1; }
    EnginePanel > #engine-text { height: auto; }
    EnginePanel > Sparkline { height: 3; margin-top: 1; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.history: deque[float] = deque(maxlen=HISTORY)
        self._text = ""

    def compose(self) -> ComposeResult:
        yield Static("no engine in this process", id="engine-text")
        yield Sparkline(list(self.history), summary_function=max, id="engine-spark")

    def on_mount(self) -> None:
        self.border_title = "engine"

    def show(self, engine: EngineInfo | None, rate: float | None) -> None:
        """`rate`: tokens/s to plot when there is no engine (derived from the run's token counts)."""
        tps = engine.tokens_per_s if engine is not None and engine.tokens_per_s is not None else rate
        if tps is not None:
            self.history.append(float(tps))
            self.query_one(Sparkline).data = list(self.history)
        if engine is None:
            text = f"tokens/s   {_num(rate, '{:.1f}')}\n(no engine stats: store source)"
        else:
            text = "\n".join([
                f"tokens/s   {_num(engine.tokens_per_s, '{:.1f}')}",
                f"batch      {_num(engine.batch_size)}",
                f"queue      {_num(engine.queue)}",
                f"hit rate   {_num(None if engine.hit_rate is None else 100 * engine.hit_rate, '{:.0f}%')}",
                f"KV pool    {_pool(engine.kv_used, engine.kv_total)}",
                f"state pool {_pool(engine.state_used, engine.state_total)}",
            ])
        if text != self._text:
            self._text = text
            self.query_one("#engine-text", Static).update(text)
