"""The tables every benchmark prints: aligned text for the terminal, Markdown for docs/BENCHMARKS.md."""

from __future__ import annotations


def text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a column-aligned table: the first column left-aligned, numbers right-aligned."""
    table = [header] + rows
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in table]


def markdown_table(command: str, header: list[str], rows: list[list[str]]) -> str:
    """The command that reproduces the numbers, then a Markdown table of them."""
    lines = [f"```\n{command}\n```", "", "| " + " | ".join(header) + " |",
             "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
