"""Load errors and the report that counts every example not kept (nothing is dropped silently)."""

from __future__ import annotations

import dataclasses
from collections import Counter

from jbilevel.errors import UserError


class DataError(UserError, ValueError):
    """A bad input row or file. The message names the file, line/row, field and the fix.

    ``reason`` is the short code the skip policy counts it under (e.g. ``missing_key``).
    """

    def __init__(self, message: str, reason: str = "bad_row"):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass
class LoadReport:
    """What happened to every input row.

    Attributes:
      n_read: rows read from the source.
      n_kept: examples kept (they get ids 0..n_kept-1 in read order).
      n_truncated: kept examples that were truncated to ``max_len``.
      skipped: count of skipped rows by reason (e.g. ``missing_key``, ``too_long``).
      messages: the first ``max_messages`` skip/truncation messages, each naming its row.
      response_end: what ends each trained response (the tokenizer's eos, or the chat
        template's turn end), with the token and its id.
      assistant_turns: how the conversations with assistant turns before their last one were
        trained, and how many ("" when there are none).
      row_limit: the ``max_rows`` that stopped the reading with rows left unread (0: read
        to the end).
    """

    n_read: int = 0
    n_kept: int = 0
    n_truncated: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)
    messages: list[str] = dataclasses.field(default_factory=list)
    max_messages: int = 20
    response_end: str = ""
    assistant_turns: str = ""
    row_limit: int = 0

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        self._note(f"skipped ({reason}): {message}")

    def truncate(self, message: str) -> None:
        self.n_truncated += 1
        self._note(f"truncated: {message}")

    def _note(self, message: str) -> None:
        if len(self.messages) < self.max_messages:
            self.messages.append(message)

    def as_dict(self) -> dict:
        """Plain-dict form for logs and JSON."""
        return {
            "n_read": self.n_read,
            "n_kept": self.n_kept,
            "n_truncated": self.n_truncated,
            "n_skipped": self.n_skipped,
            "skipped": dict(self.skipped),
            "messages": list(self.messages),
            "response_end": self.response_end,
            "assistant_turns": self.assistant_turns,
            "row_limit": self.row_limit,
        }

    def __str__(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        limit = f" (the first {self.row_limit}; more left unread)" if self.row_limit else ""
        return (
            f"read {self.n_read}{limit}, kept {self.n_kept}, truncated {self.n_truncated}, "
            f"skipped {self.n_skipped} ({reasons})"
        )
