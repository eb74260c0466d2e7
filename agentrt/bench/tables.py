"""The tables every benchmark prints: aligned text for the terminal, Markdown for docs/BENCHMARKS.md."""

from __future__ import annotations


def text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a column-aligned table: the first column left-aligned, numbers right-aligned."""
    table = [header] + rows
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in table]


def text_report(header: list[str], rows: list[list[str]], targets: list[tuple[str, bool | None]],
                machine: dict) -> str:
    """A benchmark's terminal output: the table, each target with PASS/FAIL (None: reported only),
    the machine line."""
    lines = text_table(header, rows) + [""]
    lines += [text if ok is None else f"{text}: {'PASS' if ok else 'FAIL'}" for text, ok in targets]
    lines.append(machine_line(machine))
    return "\n".join(lines)


def markdown_table(command: str, header: list[str], rows: list[list[str]]) -> str:
    """The command that reproduces the numbers, then a Markdown table of them."""
    lines = [f"```\n{command}\n```", "", "| " + " | ".join(header) + " |",
             "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def machine_info(package: str, version: str, load: float | None = None) -> dict:
    """The machine a benchmark ran on, the peer package's version, and the load before the run."""
    import os
    import platform
    from datetime import datetime, timezone

    if load is None and hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "package": f"{package} {version}", "load_average": load,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def machine_line(m: dict) -> str:
    load = f"{m['load_average']:.2f}" if m["load_average"] is not None else "?"
    return (f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['package']}; "
            f"load average {load} before the run; {m['date']}")
