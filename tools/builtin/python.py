"""`python_exec`: run model-written Python in a limited subprocess.

Each call runs `python -I -u -X utf8 -c <code>` (isolated mode: no user site,
no PYTHON* variables, no script directory on sys.path; unbuffered, so output
printed before a timeout is kept) in a fresh temporary directory, with a
minimal environment and rlimits on address space, CPU time, open files and
file size. The process gets its own session, so on timeout (or cancellation)
the whole process group is killed.

stdout and stderr go to files beside the scratch directory rather than to
pipes: a background process the code leaves behind cannot hold the call open,
and the program never blocks on a full pipe. Each file is limited by the
file-size rlimit (a program printing more than 16 MB is killed by SIGXFSZ).

This is NOT a security sandbox: the code runs as the current user, can read
any file that user can read, can use the network, and can escape the process
group with `setsid`. Use it for scratch computation, or run the runtime in a
container.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from agentrt.tools import Tool, ToolError, tool

NOFILE_LIMIT = 64
FSIZE_LIMIT = 16 * 1024 * 1024
MEMORY_SIGNALS = {signal.SIGKILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT}


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits for one run, applied in the child before exec."""

    memory_mb: int
    cpu_s: int

    def apply(self) -> None:
        import resource

        memory = self.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (self.cpu_s, self.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE_LIMIT, NOFILE_LIMIT))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@dataclass(frozen=True, slots=True)
class Output:
    """One captured stream: its first bytes and its full size."""

    kept: bytes
    total: int

    @classmethod
    def read(cls, path: Path, cap: int) -> Output:
        with path.open("rb") as f:
            return cls(f.read(cap), os.fstat(f.fileno()).st_size)

    def show(self, label: str, cap: int) -> str:
        """Decoded text plus a truncation note when the stream was longer than `cap`."""
        text = self.kept.decode("utf-8", errors="replace")
        if self.total > cap:
            text += f"\n[{label} truncated at {cap} bytes of {self.total}]"
        return text


def minimal_env(workdir: Path) -> dict[str, str]:
    """Just enough environment for Python and common tools to behave."""
    return {
        "PATH": os.defpath,
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by `pid`; fine if it is already gone."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def start(code: str, root: Path, limits: Limits) -> asyncio.subprocess.Process:
    """Start the interpreter in `root/work`, writing to `root/stdout` and `root/stderr`."""
    workdir = root / "work"
    workdir.mkdir()
    with (root / "stdout").open("wb") as out, (root / "stderr").open("wb") as err:
        try:
            return await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-u", "-X", "utf8", "-c", code,
                cwd=workdir, env=minimal_env(workdir), stdin=asyncio.subprocess.DEVNULL,
                stdout=out, stderr=err, start_new_session=True, preexec_fn=limits.apply,
            )
        except (OSError, ValueError) as exc:
            raise ToolError(f"could not start Python ({sys.executable}): {exc}") from None


async def wait_or_kill(proc: asyncio.subprocess.Process, timeout: float) -> bool:
    """Wait up to `timeout` s; kill the process group either way. True if it timed out."""
    try:
        await asyncio.wait_for(proc.wait(), timeout)
        return False
    except TimeoutError:
        return True
    finally:  # also on cancellation: leave no process of the group behind
        kill_group(proc.pid)
        if proc.returncode is None:
            await asyncio.shield(proc.wait())


def ending(returncode: int, stderr: str, timed_out: bool, timeout: float, limits: Limits) -> str:
    """One line saying how the process ended; empty for a clean exit."""
    if timed_out:
        return f"timed out after {timeout:g} s (process killed)"
    memory_hint = f"memory limit of {limits.memory_mb} MB exceeded"
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
        except ValueError:
            return f"killed by signal {-returncode}"
        if sig == signal.SIGXCPU:
            return f"killed: CPU time limit of {limits.cpu_s} s exceeded"
        if sig == signal.SIGXFSZ:
            return f"killed: file size limit of {FSIZE_LIMIT // 2**20} MB exceeded (too much output?)"
        if sig in MEMORY_SIGNALS:
            return f"killed by {sig.name}: {memory_hint}?"
        return f"killed by {sig.name}"
    if returncode == 0:
        return ""
    if "MemoryError" in stderr:
        return f"exit code {returncode}: MemoryError, {memory_hint}"
    return f"exit code {returncode}"


def report(stdout: Output, stderr: Output, cap: int, end: str) -> str:
    """stdout, then `stderr:` and stderr, then the ending line; `(no output)` if all empty."""
    parts = [stdout.show("stdout", cap)] if stdout.total else []
    if stderr.total:
        parts.append("stderr:\n" + stderr.show("stderr", cap))
    if end:
        parts.append(end)
    return "\n".join(parts) if parts else "(no output)"


async def run_code(code: str, timeout: float, limits: Limits, cap: int) -> str:
    """Run `code` in a fresh temp dir and return stdout, stderr and how it ended."""
    with tempfile.TemporaryDirectory(prefix="agentrt-python-") as tmp:
        root = Path(tmp)
        proc = await start(code, root, limits)
        timed_out = await wait_or_kill(proc, timeout)
        stdout, stderr = Output.read(root / "stdout", cap), Output.read(root / "stderr", cap)
    assert proc.returncode is not None
    end = ending(proc.returncode, stderr.kept.decode("utf-8", "replace"), timed_out, timeout, limits)
    return report(stdout, stderr, cap, end)


def python_exec(*, timeout: float = 10.0, memory_mb: int = 512, max_output: int = 20_000,
                name: str = "python") -> Tool:
    """Build a tool that runs a Python snippet in a limited subprocess.

    The result is the snippet's stdout, then `stderr:` and its stderr if any,
    then how it ended when not cleanly ("exit code 1", "timed out after 10 s
    (process killed)", "killed by SIGKILL: memory limit of 512 MB exceeded?").
    Each stream is cut at `max_output` bytes. The code runs in a new empty
    temporary directory that is deleted afterwards; this is not a security
    sandbox (see the module docstring).

    Example:
        >>> import asyncio
        >>> run = python_exec(timeout=5.0, memory_mb=256)
        >>> asyncio.run(run(code="print(sum(range(10)))"))
        '45\\n'
        >>> asyncio.run(run(code="raise SystemExit(2)"))
        'exit code 2'
    """
    if sys.platform == "win32":
        raise RuntimeError("python_exec needs a POSIX system (it uses rlimits and process groups)")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
    if not isinstance(memory_mb, int) or memory_mb < 64:
        raise ValueError(
            f"memory_mb must be an int of at least 64 (Python needs ~30 MB to start), got {memory_mb!r}")
    if not isinstance(max_output, int) or max_output < 1:
        raise ValueError(f"max_output must be a positive int, got {max_output!r}")
    limits = Limits(memory_mb=memory_mb, cpu_s=math.ceil(timeout) + 1)

    async def python(code: str) -> str:
        """Run Python code.

        Args:
            code: A complete Python program; print() what you want to see.
        """
        return await run_code(code, timeout, limits, max_output)

    description = (
        f"Run a Python 3 program in a fresh scratch directory and return what it prints "
        f"(stdout, then stderr). Limits: {timeout:g} s, {memory_mb} MB memory; "
        f"nothing persists between calls, so print() every result you need."
    )
    return tool(python, name=name, description=description, timeout=timeout + 5.0,
                side_effects=False)
