"""Typed messages the TUI's workers post back to the UI thread."""

from __future__ import annotations

from textual.message import Message

from .data import Snapshot


class SnapshotReady(Message):
    """A fresh `Snapshot`, polled by the app's snapshot worker."""

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self.snapshot = snapshot


class TranscriptReady(Message):
    """A trajectory's transcript, polled by the agent view's worker."""

    def __init__(self, trajectory_id: str, entries: list[dict]) -> None:
        super().__init__()
        self.trajectory_id, self.entries = trajectory_id, entries


class SourceError(Message):
    """Polling failed (e.g. the store is being created); shown, and tried again next tick."""

    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error
