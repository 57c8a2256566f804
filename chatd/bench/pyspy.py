"""``--profile DIR``: a py-spy profile of one chatd worker over the measured window.

:class:`PySpy` runs ``py-spy record --pid PID --duration S --rate HZ --nonblocking --format
speedscope --full-filenames`` (py-spy from the venv, the ``bench`` extra). ``--nonblocking``
reads the worker's memory without pausing it (a sample may then be torn, rarely); attaching
needs ptrace rights over the worker: root, or the same user with
``kernel.yama.ptrace_scope = 0``. py-spy itself uses CPU on the shared cores while it samples.

:func:`summarize` turns the speedscope file into shares of the sampled time: per function
*inclusive* (the function anywhere on the stack, counted once per sample: the time spent in
it and in everything it called) and *self* (the function is the leaf: where the interpreter
was; a C call made by that function, a ``write()`` say, counts for it), per thread and per
package. py-spy drops samples of idle threads, but misses some waits (a blocking
``SimpleQueue.get`` in the store's writer thread, ``time.sleep``); samples whose leaf is a
source line matching :data:`IDLE_LINE` are dropped too and counted in ``idle_dropped_s``. A
leaf ``Runner.run`` on a worker's main thread is uvloop's own C code (libuv callbacks, socket
reads) running under ``run_until_complete``.
"""

from __future__ import annotations

import contextlib
import json
import linecache
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

# A function never seen as a leaf and on this share of its thread's samples is an outer frame.
ROOT_SHARE = 0.9
# Source lines where a thread waits rather than works.
IDLE_LINE = re.compile(r"\bq\.get\(|\.get\(block=True\)|time\.sleep\(|\.wait\(|select\(")


def py_spy() -> str | None:
    """The py-spy executable: next to this interpreter (the venv), else on PATH; or None."""
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.is_file() else shutil.which("py-spy")


class PySpy:
    """One ``py-spy record`` of process ``pid`` for ``duration`` seconds into ``out``.

    :meth:`start` launches it (returns at once; a scenario calls it when its measured window
    opens); :meth:`finish` waits for it and returns what happened, with the summary.
    """

    def __init__(self, pid: int, out: Path, duration: float, rate: int = 100) -> None:
        self.pid, self.out, self.rate = pid, out, rate
        self.duration = max(1, round(duration))  # py-spy takes whole seconds
        self.proc: subprocess.Popen[bytes] | None = None
        self.error: str | None = None

    def start(self) -> None:
        """Launch py-spy; a failure to launch is recorded, not raised."""
        exe = py_spy()
        if exe is None:
            self.error = "py-spy is not installed (pip install 'chatd[bench]')"
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [exe, "record", "--pid", str(self.pid), "--duration", str(self.duration)]
        cmd += ["--rate", str(self.rate), "--nonblocking", "--full-filenames"]
        cmd += ["--format", "speedscope", "--output", str(self.out)]
        try:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        except OSError as exc:
            self.error = f"py-spy did not start: {exc}"

    def finish(self, timeout: float = 30.0, top: int = 15) -> dict[str, Any]:
        """Wait for py-spy (SIGKILL by its PID after ``timeout`` s); ``{"file", "pid",
        "rate_hz", "duration_s", "error", "summary"}``: ``error`` None and ``summary`` the
        :func:`summarize` of the file when it worked, else ``error`` says why."""
        if self.proc is not None:
            try:
                _, err = self.proc.communicate(timeout=timeout)
                if self.proc.returncode != 0:
                    lines = err.decode(errors="replace").strip().splitlines()
                    self.error = f"py-spy exited {self.proc.returncode}: " + " ".join(lines[-2:])
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                self.error = f"py-spy did not finish within {timeout:g} s"
        elif self.error is None:
            self.error = "py-spy was never started"
        summary: dict[str, Any] | None = None
        if self.error is None:
            try:
                summary = summarize(json.loads(self.out.read_text()), top)
            except (OSError, ValueError, KeyError) as exc:
                self.error = f"unreadable profile {self.out}: {exc!r}"
        return {
            "file": str(self.out),
            "pid": self.pid,
            "rate_hz": self.rate,
            "duration_s": self.duration,
            "error": self.error,
            "summary": summary,
        }

    def kill(self) -> None:
        """Stop py-spy now if it still runs (by its PID)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.kill()
            self.proc.wait(5)


def _source_is_idle(frame: dict[str, Any]) -> bool:
    text = linecache.getline(str(frame.get("file") or ""), int(frame.get("line") or 0))
    return bool(IDLE_LINE.search(text))


def short_file(file: str) -> str:
    """A frame's file without the noise: from ``site-packages/``, ``chatd/`` or the stdlib's
    ``pythonX.Y/`` on (``/x/.venv/lib/python3.11/site-packages/aiohttp/client.py`` ->
    ``aiohttp/client.py``)."""
    for marker in ("site-packages/", "/chatd/"):
        if marker in file:
            tail = file.rsplit(marker, 1)[1]
            return ("chatd/" + tail) if marker == "/chatd/" else tail
    return re.sub(r"^.*/python3\.\d+/", "", file)


def summarize(
    doc: dict[str, Any],
    top: int = 15,
    is_idle: Callable[[dict[str, Any]], bool] = _source_is_idle,
) -> dict[str, Any]:
    """Shares (% of the non-idle sampled time, one decimal) of a speedscope document.

    Expects py-spy's layout: ``shared.frames`` (``name``, ``file``, ``line``) and
    ``profiles``, one sampled profile per thread (``name`` like ``Thread 12 "MainThread"``),
    each with ``samples`` (stacks of frame indexes, root first) and ``weights`` (seconds).
    A sample whose leaf frame ``is_idle`` is dropped. Returns ``sampled_s`` (kept seconds),
    ``idle_dropped_s``, ``roots`` (per thread, its outer frames, outermost first: the
    functions never seen as a leaf and on at least :data:`ROOT_SHARE` of the thread's
    samples, such as ``main`` and ``Master.run`` above a worker's event loop; their
    inclusive share would only repeat the thread's; not 100 %: py-spy cannot always unwind
    through uvloop's C loop, and then sees only the coroutine's frames) and ``[name,
    share]`` lists,
    largest first: ``inclusive`` (top ``top``, roots left out), ``self`` (top ``top``),
    ``threads``, ``by_package``. Functions are named ``name (short file)``.
    """
    frames: list[dict[str, Any]] = doc["shared"]["frames"]
    names = [f"{f.get('name', '?')} ({short_file(str(f.get('file') or '?'))})" for f in frames]
    idle = [is_idle(f) for f in frames]
    incl: Counter[str] = Counter()
    incl_by_thread: Counter[tuple[str, str]] = Counter()
    depth: dict[str, int] = {}
    self_: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    pkg: Counter[str] = Counter()
    dropped = 0.0
    for prof in doc.get("profiles", []):
        title = str(prof.get("name", "?"))
        quoted = title.split('"')
        thread = quoted[1] if len(quoted) >= 3 else title
        for stack, weight in zip(prof.get("samples", []), prof.get("weights", []), strict=True):
            if not stack:
                continue
            leaf = stack[-1]
            if idle[leaf]:
                dropped += weight
                continue
            threads[thread] += weight
            self_[names[leaf]] += weight
            file = short_file(str(frames[leaf].get("file") or "?"))
            pkg[file.split("/", 1)[0] if "/" in file else file] += weight
            for d, i in enumerate(stack):
                depth.setdefault(names[i], d)
            for name in {names[i] for i in stack}:
                incl[name] += weight
                incl_by_thread[name, thread] += weight
    total = sum(threads.values())
    partial = {f for (f, t), w in incl_by_thread.items() if w < ROOT_SHARE * threads[t]}
    outer = set(incl) - partial - set(self_)
    roots = {
        t: sorted(
            {f for (f, t2) in incl_by_thread if t2 == t and f in outer}, key=lambda f: depth[f]
        )
        for t in threads
    }

    def share(c: Counter[str], n: int | None = None) -> list[list[Any]]:
        return [[k, round(100 * v / total, 1) if total else 0.0] for k, v in c.most_common(n)]

    return {
        "sampled_s": round(total, 3),
        "idle_dropped_s": round(dropped, 3),
        "roots": {t: r for t, r in roots.items() if r},
        "inclusive": share(Counter({f: w for f, w in incl.items() if f not in outer}), top),
        "self": share(self_, top),
        "threads": share(threads),
        "by_package": share(pkg, 10),
    }


def format_summary(profile: dict[str, Any], top: int = 12) -> str:
    """A few lines for the terminal: the file, then the top ``top`` functions by inclusive
    and by self time (or the error)."""
    head = f"profile of worker pid {profile['pid']}: {profile['file']}"
    if profile.get("error"):
        return f"{head}\n  not recorded: {profile['error']}"
    s = profile["summary"]
    lines = [
        f"{head}",
        f"  {s['sampled_s']:.2f} s sampled at {profile['rate_hz']} Hz over "
        f"{profile['duration_s']} s ({s['idle_dropped_s']:.2f} s idle dropped); threads: "
        + ", ".join(f"{k} {v:.1f} %" for k, v in s["threads"]),
        *(
            f"  {t}: {len(r)} outer frames left out below, down to {r[-1]}"
            for t, r in s["roots"].items()
        ),
        "  inclusive (function and its callees):",
        *(f"  {v:5.1f} %  {k}" for k, v in s["inclusive"][:top]),
        "  self (where the interpreter was):",
        *(f"  {v:5.1f} %  {k}" for k, v in s["self"][:top]),
    ]
    return "\n".join(lines)
