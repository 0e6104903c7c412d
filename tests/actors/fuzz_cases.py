"""Machinery for ``test_cli_fuzz.py``: running ``ppn`` quickly and damaging ledger files.

Standard library only -- nothing here imports the project, so the test process never
runs ledger code of another tree (the virtualenv's editable install points elsewhere).

Running ``ppn``
---------------
A fresh ``python -m actors.cli`` spends ~0.3 s importing before it does anything,
and the fuzz test runs ~900 commands.  :class:`ForkServer` pays that once: a server
process (``python fuzz_cases.py serve``, working directory and ``PYTHONPATH`` the
repository under test) imports ``actors.cli`` and then forks one child per command.
The child is what ``python -m actors.cli ARGS`` would be after its imports: a new
session, stdin ``/dev/null``, stdout and stderr files, the module run as
``__main__`` by :mod:`runpy`, an uncaught exception printed by ``sys.excepthook``
(the same "Traceback (most recent call last):" the interpreter prints) with exit
status 1, ``SystemExit`` handled as the interpreter does, then the interpreter's
shutdown steps (non-daemon threads joined, ``atexit``, stdout flushed).
``PPN_FUZZ_SPAWN=1`` selects :class:`Spawner` instead: a real
``python -m actors.cli`` process per command (~4x slower: ~4.5 minutes on 2 CPUs).

Each command's address space is limited to :data:`AS_LIMIT`, so a reader that
tries to hold a 64 GiB sparse file in memory fails at once with ``MemoryError``
(on any machine) instead of filling the RAM.  A command is hung when it has not
exited after ``timeout`` seconds -- or, sooner, when one of its processes has
been blocked for :data:`FIFO_STALL` seconds opening a FIFO nobody will ever open
for writing (the kernel's ``wait_for_partner``): a state no process leaves.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import random
import resource
import runpy
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HUGE = 64 << 30
"""Size of the "huge sparse file" mutations."""

AS_LIMIT = 4 << 30
"""Address-space limit of each ``ppn`` process (bytes)."""

FIFO_STALL = 1.0
"""Seconds blocked in a FIFO open that count as a hang."""

TRACEBACK = b"Traceback (most recent call last)"


# ----------------------------------------------------------------------------- outcomes
@dataclass(frozen=True)
class Outcome:
    """How one ``ppn`` command ended."""

    argv: tuple[str, ...]
    returncode: int | None
    """Exit status; negative: killed by that signal; None: hung (and killed)."""
    stdout: bytes
    stderr: bytes
    hung: str | None
    """Why the command counts as hung, or None."""
    seconds: float

    @property
    def traceback(self) -> bool:
        return TRACEBACK in self.stdout or TRACEBACK in self.stderr

    @staticmethod
    def _last(data: bytes) -> str:
        lines = [ln for ln in data.decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1] if lines else ""

    @property
    def last_stderr_line(self) -> str:
        return self._last(self.stderr)

    @property
    def last_stdout_line(self) -> str:
        return self._last(self.stdout)

    @property
    def stderr_lines(self) -> int:
        return len([ln for ln in self.stderr.splitlines() if ln.strip()])


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(root))
    for name in ("PYTHONSTARTUP", "PYTHONINSPECT", "PYTHONSAFEPATH"):
        env.pop(name, None)
    return env


def _fifo_blocked(pid: int) -> bool:
    """Whether ``pid`` or a descendant sleeps in the kernel opening a writer-less FIFO."""
    todo, seen = [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            if Path(f"/proc/{p}/wchan").read_text().strip() == "wait_for_partner":
                return True
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return False


def _kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
            return
        except (ProcessLookupError, PermissionError):
            continue


def _watch(pid: int, exited: threading.Event, timeout: float) -> str | None:
    """Wait for ``exited``; kill the process (group) and say why if it hangs."""
    started = time.monotonic()
    blocked_since: float | None = None
    while not exited.wait(0.1):
        now = time.monotonic()
        if now - started > timeout:
            reason = f"still running after {timeout:.0f} s"
        elif _fifo_blocked(pid):
            blocked_since = blocked_since or now
            if now - blocked_since < FIFO_STALL:
                continue
            reason = f"blocked opening a FIFO (wait_for_partner) for {FIFO_STALL:.0f} s"
        else:
            blocked_since = None
            continue
        _kill_group(pid)
        exited.wait(30)
        return reason
    return None


class _Files:
    """stdout/stderr files of one command, removed once read."""

    def __init__(self, out_dir: Path, n: int) -> None:
        self.out, self.err = out_dir / f"{n}.out", out_dir / f"{n}.err"

    def read(self) -> tuple[bytes, bytes]:
        data = []
        for p in (self.out, self.err):
            try:
                with p.open("rb") as f:
                    data.append(f.read(4 << 20))
                p.unlink()
            except FileNotFoundError:
                data.append(b"")
        return data[0], data[1]


# ----------------------------------------------------------------------------- runners
class ForkServer:
    """``ppn`` commands forked from one warm interpreter (see the module docstring)."""

    def __init__(self, root: Path, work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.work = work
        self._log = (work / "fork-server.log").open("wb")
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "serve", str(AS_LIMIT)],
            cwd=root, env=_env(root), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log)
        assert self._proc.stdout is not None and self._proc.stdin is not None
        ready = self._proc.stdout.readline().decode().split(" ", 1)
        if ready[0] != "ready":
            self.close()
            raise RuntimeError(f"fork server did not start: "
                               f"{(work / 'fork-server.log').read_text()[-2000:]}")
        self.cli_file = Path(ready[1].strip())
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._started: dict[int, int] = {}
        self._exited: dict[int, int] = {}
        self._pid_events: dict[int, threading.Event] = {}
        self._exit_events: dict[int, threading.Event] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _event(self, table: dict[int, threading.Event], key: int) -> threading.Event:
        with self._lock:
            return table.setdefault(key, threading.Event())

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            what, a, b = raw.decode().split()
            with self._lock:
                if what == "pid":
                    self._started[int(a)] = int(b)
                    self._pid_events.setdefault(int(a), threading.Event()).set()
                elif what == "exit":
                    self._exited[int(a)] = int(b)
                    self._exit_events.setdefault(int(a), threading.Event()).set()
        with self._lock:  # the server is gone: wake every waiter
            for ev in (*self._pid_events.values(), *self._exit_events.values()):
                ev.set()

    def run(self, argv: Sequence[str], cwd: Path, timeout: float) -> Outcome:
        n = next(self._ids)
        files = _Files(self.work, n)
        request = {"id": n, "argv": list(argv), "cwd": str(cwd),
                   "stdout": str(files.out), "stderr": str(files.err)}
        started = time.monotonic()
        assert self._proc.stdin is not None
        with self._lock:
            self._proc.stdin.write(json.dumps(request).encode() + b"\n")
            self._proc.stdin.flush()
        if not self._event(self._pid_events, n).wait(30):
            raise RuntimeError("fork server stopped answering")
        with self._lock:
            pid = self._started.pop(n, None)
        if pid is None:
            raise RuntimeError("fork server gone: "
                               f"{(self.work / 'fork-server.log').read_text()[-2000:]}")
        exited = self._event(self._exit_events, pid)
        hung = _watch(pid, exited, timeout)
        with self._lock:
            status = self._exited.pop(pid, None)
            self._exit_events.pop(pid, None)
            self._pid_events.pop(n, None)
        if status is None:
            raise RuntimeError(f"fork server lost child {pid}")
        out, err = files.read()
        rc = None if hung else os.waitstatus_to_exitcode(status)
        return Outcome(tuple(argv), rc, out, err, hung, time.monotonic() - started)

    def close(self) -> None:
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()  # the server kills what still runs, then exits
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()


class Spawner:
    """One real ``python -m actors.cli`` process per command (``PPN_FUZZ_SPAWN=1``)."""

    def __init__(self, root: Path, work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.root, self.work = root, work
        self._ids = itertools.count()
        prlimit = shutil.which("prlimit")
        self._prefix = [prlimit, f"--as={AS_LIMIT}", "--"] if prlimit else []
        self.cli_file = root / "actors" / "cli.py"

    def run(self, argv: Sequence[str], cwd: Path, timeout: float) -> Outcome:
        files = _Files(self.work, next(self._ids))
        started = time.monotonic()
        with files.out.open("wb") as out, files.err.open("wb") as err:
            proc = subprocess.Popen([*self._prefix, sys.executable, "-m", "actors.cli", *argv],
                                    cwd=cwd, env=_env(self.root),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
        exited = threading.Event()

        def wait() -> None:
            proc.wait()
            exited.set()
        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        hung = _watch(proc.pid, exited, timeout)
        waiter.join()
        o, e = files.read()
        return Outcome(tuple(argv), None if hung else proc.returncode, o, e, hung,
                       time.monotonic() - started)

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- the server
def _exit_code(exc: SystemExit) -> int:
    """What the interpreter exits with for an uncaught ``SystemExit``."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _child(req: dict[str, object], as_limit: int) -> None:
    """In a forked child: become ``python -m actors.cli ARGV``; never returns."""
    code = 1
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        fds = [os.open(os.devnull, os.O_RDONLY),
               os.open(str(req["stdout"]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
               os.open(str(req["stderr"]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)]
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(3, 4096)
        resource.setrlimit(resource.RLIMIT_AS, (as_limit, as_limit))
        os.chdir(str(req["cwd"]))
        argv = req["argv"]
        assert isinstance(argv, list)
        sys.argv = ["-m", *map(str, argv)]
        try:
            runpy.run_module("actors.cli", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc)
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        shutdown = getattr(threading, "_shutdown", None)
        if shutdown is not None:
            shutdown()
        atexit._run_exitfuncs()
        try:
            sys.stdout.flush()
        except Exception:
            code = 120  # what the interpreter exits with when flushing stdout fails
        with contextlib.suppress(Exception):
            sys.stderr.flush()
    finally:
        os._exit(code)


def _serve(as_limit: int) -> None:
    import selectors
    root = os.getcwd()
    sys.path[0] = root  # as ``python -m`` would have it, not this file's directory
    import actors
    import actors.cli  # the expensive part (its imports), done once
    cli_file = actors.cli.__file__
    del sys.modules["actors.cli"]  # ``-m`` runs it as __main__, never imported by name
    del actors.cli

    def say(line: str) -> None:
        data = (line + "\n").encode()
        while data:
            data = data[os.write(1, data):]

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    live: set[int] = set()
    say(f"ready {cli_file}")
    buf = b""
    eof = False

    def reap() -> None:
        while live:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            live.discard(pid)
            say(f"exit {pid} {status}")

    while not eof:
        for key, _ in sel.select(1.0):
            if key.fd == wake_r:
                try:
                    while os.read(wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            data = os.read(0, 1 << 16)
            if not data:
                eof = True
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(req, as_limit)
                live.add(pid)
                say(f"pid {req['id']} {pid}")
        reap()
    for pid in live:
        _kill_group(pid)
    for pid in list(live):
        os.waitpid(pid, 0)


# ----------------------------------------------------------------------------- mutations
MUTATIONS: tuple[tuple[str, int], ...] = (
    ("overwrite", 0), ("overwrite", 1), ("overwrite", 2),
    ("random", 0),
    ("truncate", 0), ("truncate", 1), ("truncate-0", 0), ("truncate-boundary", 0),
    ("delete", 0),
    ("fifo", 0), ("directory", 0), ("symlink-loop", 0),
    ("sparse-64g", 0), ("zeros-64g", 0),
)
"""(mutation, seed) pairs applied to each file.  ``overwrite``: 1-16 random bytes at a
random offset; ``random``: the whole file replaced by as many random bytes;
``truncate``: cut at a random point; ``truncate-boundary``: cut where a well-formed
shorter file could end (after a checkpoint frame of a segment, after a line of a
text file, half-way through a snapshot); ``sparse-64g``: an empty file of 64 GiB;
``zeros-64g``: the original followed by zeros up to 64 GiB."""


def rng_for(*parts: object) -> random.Random:
    """A seeded generator (str seeds hash with SHA-512: the same on every run)."""
    return random.Random(":".join(map(str, parts)))


def _fingerprint(path: Path) -> tuple[str, bytes | None]:
    """What is at ``path`` (kind, bytes of a regular file), to tell if a mutation did anything."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return "missing", None
    if path.is_symlink():
        return "symlink", os.readlink(path).encode()
    if path.is_dir():
        return "directory", None
    if path.is_fifo():
        return "fifo", None
    with path.open("rb") as f:
        return "file", f.read(1 << 20) + str(st.st_size).encode()


def mutate(path: Path, mutation: str, seed: int, boundaries: Sequence[int],
           loop_dir: Path) -> bool:
    """Apply ``mutation`` to ``path`` in place; False if it left the file as it was.

    ``boundaries``: offsets where a well-formed shorter version of the file could end.
    ``loop_dir``: where the two links of a symlink loop go (outside the ledger).
    """
    before = _fingerprint(path)
    rng = rng_for(path.name, mutation, seed)
    data = path.read_bytes()
    if mutation == "overwrite":
        k = min(rng.randint(1, 16), len(data))
        off = rng.randrange(len(data) - k + 1)
        path.write_bytes(data[:off] + rng.randbytes(k) + data[off + k:])
    elif mutation == "random":
        path.write_bytes(rng.randbytes(len(data)))
    elif mutation == "truncate":
        os.truncate(path, rng.randrange(1, len(data)))
    elif mutation == "truncate-0":
        os.truncate(path, 0)
    elif mutation == "truncate-boundary":
        inner = [b for b in boundaries if 0 < b < len(data)]
        os.truncate(path, inner[len(inner) // 2] if inner else len(data) // 2)
    elif mutation == "delete":
        path.unlink()
    elif mutation == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif mutation == "directory":
        path.unlink()
        path.mkdir()
    elif mutation == "symlink-loop":
        path.unlink()
        a, b = loop_dir / f"{path.name}.loop-a", loop_dir / f"{path.name}.loop-b"
        a.symlink_to(b)
        b.symlink_to(a)
        path.symlink_to(a)
    elif mutation == "sparse-64g":
        path.unlink()
        path.touch()
        os.truncate(path, HUGE)
    elif mutation == "zeros-64g":
        os.truncate(path, HUGE)
    else:
        raise ValueError(f"unknown mutation {mutation!r}")
    return _fingerprint(path) != before


def line_ends(data: bytes) -> list[int]:
    """Offsets just after each newline (where a text file could end)."""
    return [i + 1 for i, c in enumerate(data) if c == 0x0A]


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    _serve(int(sys.argv[2]))
