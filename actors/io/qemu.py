"""pd-vmm's real adapter: QEMU processes, spoken to through ``qemu.qmp`` on asyncio.

One asyncio loop, on the adapter's own thread, serves every guest.  Each guest has two
QMP UNIX sockets in the node's ``vms/`` directory (0700): ``NAME.qmp``, which this
adapter holds for commands and events, and ``NAME.audit.qmp``, which it never touches
(QEMU serves one client per socket, so an auditor or a test can ask QEMU itself,
independently of pd-vmm).

* **Launch**: the command line is built here (:func:`qemu_argv`) from the request's
  sizes, the accelerator's row of :data:`ACCELERATORS` and the ``[qemu]`` settings of
  the profiles file.  Under ``direct`` supervision QEMU is this process's child, in its
  own session (the node's signals do not reach it, and it outlives a node restart);
  under ``systemd`` it is an instance of the shipped ``ppn-vm@.service`` template.  A
  socket file is not readiness: the launch is answered once the QMP greeting came and
  ``query-status`` answered, and fails (QEMU killed) if QEMU exits first, the socket
  speaks garbage or closes, or nothing comes within :data:`START_TIMEOUT`.
* **Watching**: a guest's process is watched through a pidfd on the loop (no thread
  per guest, and it works as well for a QEMU adopted after a restart as for a child);
  its end is a ``VmExited``.  QMP events of :data:`FORWARDED` are ``VmEvent``s.
* **Re-attachment**: a pid is taken back only if it is alive, not a zombie, and its
  command line names the guest's socket; then QMP must greet again.

The adapter holds no tokens and journals nothing: what it reports becomes state only
through pd-vmm's events.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import structlog
from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError, Runstate

from actors import vm_config
from actors.io.base import Answer, Emit, printable_line
from actors.pds.base import IoAnswer, IoFailure, IoRequest, IoResult
from actors.pds.pd_vmm import (
    AttachVm,
    LaunchVm,
    LoadHost,
    MakeOverlay,
    RemoveVmFiles,
    VmCommand,
    VmEvent,
    VmExited,
)
from ledger.vms import NAME_RE

log = structlog.get_logger("qemu")
# qemu.qmp logs a traceback for each connection that fails; this adapter reports each
# failure itself, in one line, to the PD that asked.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

START_TIMEOUT = 30.0  # launch to QMP greeting (many guests at once on two cores)
ATTACH_TIMEOUT = 10.0  # a guest found at restart that does not greet by then is killed
COMMAND_TIMEOUT = 10.0
QUIT_GRACE = 10.0  # after `quit`, a QEMU still there is killed
MAX_SOCKET_PATH = 107  # sun_path
VM_SUBDIR = "vms"
AUDIT_SUFFIX = ".audit.qmp"
UNIT_TEMPLATE = Path(__file__).resolve().parent.parent / "units" / "ppn-vm@.service"
UNIT_DIR = Path("/etc/systemd/system")
COMMANDS = frozenset({"stop", "cont", "system_powerdown", "quit", "balloon", "query-status",
                      "query-balloon"})
"""The QMP commands pd-vmm may send; anything else is refused here too."""
FORWARDED = frozenset({"STOP", "RESUME", "SHUTDOWN", "POWERDOWN", "RESET",
                       "BALLOON_CHANGE", "GUEST_PANICKED"})
"""QMP events passed to pd-vmm (with only the small data it reads)."""
KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12


def kvm_works(device: str = "/dev/kvm") -> bool:
    """Whether ``device`` opens read-write and answers KVM's API version."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, KVM_GET_API_VERSION) == KVM_API_VERSION
    except OSError:
        return False
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Accel:
    name: str
    available: Callable[[], bool]
    args: Callable[[dict[str, Any]], list[str]]


ACCELERATORS: dict[str, Accel] = {
    "kvm": Accel("kvm", kvm_works, lambda q: ["-accel", "kvm"]),
    "tcg": Accel("tcg", lambda: True,
                 lambda q: ["-accel", f"tcg,tb-size={int(q['tcg_cache_mib'])}"]),
}
"""How a guest may run, best first.  NetBSD's NVMM is one more row: available when
``/dev/nvmm`` opens, run with ``-accel nvmm``.  The names are the ledger's (ACCELS)."""


def _opt(value: str) -> str:
    """A value inside a QEMU ``key=value,...`` option: its commas doubled (a state
    directory with a comma in its path must not add options of its own)."""
    return value.replace(",", ",,")


def qmp_arg(socket_path: str) -> str:
    """The ``-qmp`` argument of a guest's socket (also how its process is recognised)."""
    return f"unix:{_opt(socket_path)},server=on,wait=off"


def _private_file(path: Path) -> int:
    """A new file of this process's only (0600), never through a link planted there:
    whatever was at ``path`` goes first (an ``unlink`` removes a link, not its target)."""
    try:
        path.unlink(missing_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                       | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise RuntimeError(f"{path.name}: {exc.strerror or exc}") from None


def qemu_argv(qemu: dict[str, Any], name: str, vcpus: int, ram_mib: int, accel: str,
              qmp: str, audit: str, overlay: str | None) -> list[str]:
    """The guest's QEMU command line (no shell, no secret in it)."""
    argv = [qemu["binary"], "-name", f"guest={name},debug-threads=on",
            "-machine", qemu["machine"], *ACCELERATORS[accel].args(qemu),
            "-smp", str(vcpus), "-m", str(ram_mib), "-nodefaults", "-no-user-config",
            "-display", "none", "-qmp", qmp_arg(qmp), "-qmp", qmp_arg(audit),
            "-device", "virtio-balloon-pci,id=balloon0"]
    if overlay is not None:
        argv += ["-drive", f"file={_opt(overlay)},if=virtio,format=qcow2"]
    return argv


def systemd_env(argv: list[str]) -> str:
    """The ``ppn-vm@.service`` instance's environment file for ``argv``: the unit runs
    ``/usr/bin/env ${PPN_QEMU} $PPN_QEMU_ARGS``, and systemd splits an unquoted ``$VAR``
    at whitespace, so no argument may hold whitespace, quotes, ``$``, ``%`` or ``\\``."""
    if not argv or any(not arg or any(c.isspace() or c in "\"'\\$%" for c in arg)
                       for arg in argv):
        raise RuntimeError("systemd supervision: a path with spaces or quotes cannot go "
                           "into the unit's environment file")
    return f"PPN_QEMU={argv[0]}\nPPN_QEMU_ARGS={' '.join(argv[1:])}\n"


def unit_instance(path: Path) -> str:
    """``systemd-escape --path``: the template's instance name for a guest's file stem."""
    text = str(path).strip("/")
    out = []
    for i, ch in enumerate(text):
        if ch == "/":
            out.append("-")
        elif (ch.isascii() and (ch.isalnum() or ch in ":_")) or (ch == "." and i > 0):
            out.append(ch)
        else:
            out.append("".join(f"\\x{b:02x}" for b in ch.encode()))
    return "".join(out)


def host_memory_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("/proc/meminfo has no MemTotal")


def _tail(path: Path, limit: int = 300) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return printable_line(text)[-limit:]


def _alive(pid: int, socket_path: str) -> str | None:
    """Why ``pid`` is not this guest's QEMU (None: it is).  Asked once a pidfd holds
    the process, so a pid reused meanwhile cannot pass for it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"no process {pid}"
    if stat.rpartition(")")[2].split()[:1] == ["Z"]:
        return f"process {pid} has exited"
    if qmp_arg(socket_path).encode() not in cmdline:
        return f"process {pid} is not this guest's QEMU"
    return None


class _Forward(EventListener):
    """Passes a guest's QMP events on as they come; keeps no history (a chatty guest
    does not grow the node)."""

    def __init__(self, name: str, emit: Callable[[VmEvent], None]) -> None:
        super().__init__()
        self._name, self._emit = name, emit

    async def put(self, event: Any) -> None:
        # qemu.qmp's Message is a Mapping, not a dict.
        kind = event.get("event") if isinstance(event, Mapping) else None
        if kind not in FORWARDED:
            return
        data = event.get("data") if isinstance(event.get("data"), Mapping) else {}
        small = {k: data[k] for k in ("actual", "reason", "guest")
                 if type(data.get(k)) in (int, str, bool)}
        self._emit(VmEvent(self._name, str(kind), small))


@dataclass
class _Guest:
    name: str
    pid: int
    qmp: str
    audit: str
    proc: subprocess.Popen[bytes] | None
    pidfd: int = -1
    client: QMPClient | None = None
    exited: bool = False
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)


class QemuAdapter:
    """pd-vmm's adapter on a real host."""

    name = "qemu"

    def __init__(self, state_dir: Path, *, shipped: Path = vm_config.SHIPPED) -> None:
        self.state_dir = Path(state_dir)
        self.vm_dir = self.state_dir / VM_SUBDIR
        self._shipped = shipped
        self._emit: Emit = lambda event: None
        self._closed = False
        self._guests: dict[str, _Guest] = {}
        self._config: dict[str, Any] | None = None
        self._supervision = "direct"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ppn-io-qemu",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ Adapter
    def attach(self, emit: Emit) -> None:
        self._emit = emit

    def submit(self, request: IoRequest, answer: Answer) -> None:
        if self._closed:
            answer(IoFailure(request.request_id, "qemu: closed"))
            return
        asyncio.run_coroutine_threadsafe(self._serve(request, answer), self._loop)

    def close(self) -> None:
        """Stop answering and let go of the QMP connections; the guests keep running
        (a restarted node re-attaches to them)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._let_go(), self._loop).result(10.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5.0)
        if not self._thread.is_alive():
            self._loop.close()

    async def _let_go(self) -> None:
        guests, self._guests = list(self._guests.values()), {}
        for g in guests:
            self._unwatch(g)
        await asyncio.gather(*(self._hang_up(g) for g in guests), return_exceptions=True)

    # ------------------------------------------------------------------ serving
    async def _serve(self, request: IoRequest, answer: Answer) -> None:
        rid = request.request_id
        result: IoAnswer
        try:
            handler = self._HANDLERS.get(type(request))
            if handler is None:
                raise RuntimeError(f"no such request {type(request).__name__}")
            result = IoResult(rid, await handler(self, request))
        except Exception as exc:
            text = printable_line(str(exc)) or type(exc).__name__
            result = IoFailure(rid, text[:300])
        if self._closed:
            return
        try:
            answer(result)
        except Exception as exc:
            log.warning("io.answer_failed", adapter=self.name, error=repr(exc)[:300])

    def _inside(self, path: str, what: str) -> Path:
        if type(path) is not str or "\0" in path:
            raise RuntimeError(f"{what}: not a path")
        p = Path(path)
        if p.parent.resolve() != self.vm_dir.resolve() or not p.name or p.is_symlink():
            raise RuntimeError(f"{what} {path[:120]}: not a file of {self.vm_dir}")
        return p

    # ------------------------------------------------------------------ host
    async def _load_host(self, r: LoadHost) -> dict[str, Any]:
        config = vm_config.load(self.state_dir, self._shipped)
        with contextlib.suppress(FileExistsError):
            self.vm_dir.mkdir(mode=0o700)
        if self.vm_dir.is_symlink() or not self.vm_dir.is_dir():
            # Guests' files are made and removed there: a link to elsewhere would make
            # "inside vms/" mean anywhere.
            raise RuntimeError(f"{self.vm_dir}: not a directory (a link, or a file)")
        os.chmod(self.vm_dir, 0o700, follow_symlinks=False)
        qemu = config["qemu"]
        if qemu["supervision"] == "auto":
            self._supervision = "systemd" if Path("/run/systemd/system").is_dir() else "direct"
        else:
            self._supervision = qemu["supervision"]
        self._config = config
        binary = shutil.which(qemu["binary"])
        return {"profiles": config["profiles"], "limits": config["limits"],
                "mem_mib": host_memory_mib(), "cpus": os.cpu_count() or 1,
                "load": round(os.getloadavg()[0], 2),
                "accels": [a.name for a in ACCELERATORS.values() if a.available()],
                "vm_dir": str(self.vm_dir), "supervision": self._supervision,
                "qemu": binary or f"{qemu['binary']} (not found)"}

    async def _overlay(self, r: MakeOverlay) -> dict[str, Any]:
        overlay = self._inside(r.overlay, "overlay")
        image = Path(r.image).resolve()
        if image.parent == self.vm_dir.resolve():
            raise RuntimeError(f"image {r.image[:120]}: inside the guests' directory")
        info = await self._run(["qemu-img", "info", "--output=json", "-U", str(image)])
        try:
            fmt = json.loads(info)["format"]
        except (ValueError, KeyError, TypeError):
            raise RuntimeError(f"qemu-img info {image.name}: not understood") from None
        if fmt not in ("qcow2", "raw"):
            raise RuntimeError(f"image {image.name}: format {str(fmt)[:20]} (qcow2 or raw)")
        overlay.unlink(missing_ok=True)  # a leftover of a create that never got recorded
        await self._run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image),
                         "-F", fmt, str(overlay)])
        os.chmod(overlay, 0o600)
        return {"overlay": str(overlay), "format": fmt}

    async def _run(self, argv: list[str], timeout: float = 30.0) -> str:
        def run() -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(argv, capture_output=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        try:
            done = await self._loop.run_in_executor(None, run)
        except FileNotFoundError:
            raise RuntimeError(f"{argv[0]}: not installed") from None
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{argv[0]} {argv[1]}: no answer within {timeout:g} s") from None
        if done.returncode != 0:
            err = " ".join(done.stderr.decode(errors="replace").split())[:200]
            raise RuntimeError(f"{argv[0]} {argv[1]} failed ({done.returncode}): {err}")
        return done.stdout.decode(errors="replace")

    # ------------------------------------------------------------------ launch
    async def _launch(self, r: LaunchVm) -> dict[str, Any]:
        if self._config is None:
            raise RuntimeError("the host was not loaded")
        if not NAME_RE.fullmatch(r.name):
            raise RuntimeError(f"bad guest name {r.name[:40]!r}")
        old = self._guests.get(r.name)
        if old is not None and not old.exited:
            raise RuntimeError(f"{r.name} runs already (pid {old.pid})")
        accel = ACCELERATORS.get(r.accel)
        if accel is None or not accel.available():
            have = ", ".join(a.name for a in ACCELERATORS.values() if a.available())
            raise RuntimeError(f"accelerator {r.accel!r} is not available on this host "
                               f"(have: {have})")
        qmp = self._inside(r.qmp, "QMP socket")
        audit = qmp.with_name(r.name + AUDIT_SUFFIX)
        if len(os.fsencode(audit)) > MAX_SOCKET_PATH:
            raise RuntimeError(f"QMP socket path {str(audit)[:60]}...: longer than "
                               f"{MAX_SOCKET_PATH} bytes (use a shorter state directory)")
        overlay = None if r.overlay is None else str(self._inside(r.overlay, "overlay"))
        if overlay is not None and not Path(overlay).is_file():
            raise RuntimeError(f"overlay {overlay[:120]}: missing")
        for stale in (qmp, audit):
            if _served(stale):
                raise RuntimeError(f"{stale.name}: something still serves it (a QEMU of "
                                   f"{r.name} not known here?): not started twice")
            stale.unlink(missing_ok=True)
        argv = qemu_argv(self._config["qemu"], r.name, r.vcpus, r.ram_mib, r.accel,
                         str(qmp), str(audit), overlay)
        logfile = self.vm_dir / f"{r.name}.log"
        if self._supervision == "systemd":
            pid, proc = await self._systemd_start(r.name, argv), None
        else:
            with os.fdopen(_private_file(logfile), "wb") as out:
                try:
                    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=out, start_new_session=True,
                                            close_fds=True)
                except OSError as exc:
                    raise RuntimeError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
            pid = proc.pid
        g = _Guest(r.name, pid, str(qmp), str(audit), proc)
        deadline = self._loop.time() + START_TIMEOUT  # all of it: greeting and answers
        try:
            self._watch(g)
            await self._greeted(g, START_TIMEOUT, logfile)
            status = await self._execute(g, "query-status", deadline=deadline)
            actual = await self._balloon_actual(g, deadline)
        except BaseException:
            self._kill(g)
            self._unwatch(g)
            await self._hang_up(g)
            for left in (qmp, audit):
                left.unlink(missing_ok=True)
            raise
        self._guests[r.name] = g
        log.info("qemu.started", vm=r.name, pid=pid, accel=r.accel,
                 supervision=self._supervision)
        return {"pid": pid, "status": status.get("status"), "actual": actual,
                "audit_qmp": str(audit), "supervision": self._supervision}

    async def _systemd_start(self, name: str, argv: list[str]) -> int:
        text = systemd_env(argv)
        env = self.vm_dir / f"{name}.env"
        with os.fdopen(_private_file(env), "w") as f:
            f.write(text)
        installed = UNIT_DIR / UNIT_TEMPLATE.name
        text = UNIT_TEMPLATE.read_text()
        if not installed.exists() or installed.read_text() != text:
            installed.write_text(text)
            await self._run(["systemctl", "daemon-reload"])
        unit = f"ppn-vm@{unit_instance(self.vm_dir / name)}.service"
        await self._run(["systemctl", "start", unit])
        out = await self._run(["systemctl", "show", "--property=MainPID", "--value", unit])
        pid = int(out.strip() or 0)
        if pid <= 0:
            raise RuntimeError(f"{unit}: started, but has no main process")
        return pid

    async def _greeted(self, g: _Guest, timeout: float, logfile: Path | None) -> None:
        """Connect once QEMU's QMP greets; fail if QEMU ends first or the socket is
        not QMP."""
        deadline = self._loop.time() + timeout
        while True:
            if g.exited:
                tail = _tail(logfile) if logfile is not None else ""
                code = g.proc.returncode if g.proc is not None else "?"
                raise RuntimeError(f"QEMU exited at once ({code})" + (f": {tail}" if tail
                                                                      else ""))
            left = deadline - self._loop.time()
            if left <= 0:
                raise RuntimeError(f"no QMP greeting on {g.qmp} within {timeout:g} s")
            if os.path.exists(g.qmp):
                client = QMPClient(g.name)
                try:
                    await asyncio.wait_for(client.connect(g.qmp), timeout=left)
                except QMPError as exc:
                    cause = getattr(exc, "exc", None)
                    with contextlib.suppress(Exception):
                        await client.disconnect()
                    if isinstance(cause, (FileNotFoundError, ConnectionRefusedError)):
                        await asyncio.sleep(0.005)
                        continue
                    raise RuntimeError(f"QMP on {Path(g.qmp).name}: {exc}") from None
                except TimeoutError:
                    with contextlib.suppress(Exception):
                        await client.disconnect()
                    raise RuntimeError(f"no QMP greeting on {g.qmp} within {timeout:g} s"
                                       ) from None
                # The default listener keeps every event (a history and a queue): ours
                # passes each on and keeps none, so a chatty guest does not grow the node.
                default, client.events = client.events, _Forward(g.name, self._emit_event)
                client.remove_listener(default)
                client.register_listener(client.events)
                g.client = client
                return
            await asyncio.sleep(0.005)

    def _emit_event(self, event: VmEvent) -> None:
        if not self._closed:
            self._emit(event)

    # ------------------------------------------------------------------ watching
    def _watch(self, g: _Guest) -> None:
        try:
            g.pidfd = os.pidfd_open(g.pid)
        except ProcessLookupError:
            g.exited = True
            return
        self._loop.add_reader(g.pidfd, self._ended, g)

    def _unwatch(self, g: _Guest) -> None:
        if g.pidfd >= 0:
            self._loop.remove_reader(g.pidfd)
            os.close(g.pidfd)
            g.pidfd = -1

    def _ended(self, g: _Guest) -> None:
        self._unwatch(g)
        g.exited = True
        code = -1
        if g.proc is not None:
            code = g.proc.wait()
        else:
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(g.pid, os.WNOHANG)
                if pid == g.pid:
                    code = os.waitstatus_to_exitcode(status)
        task = self._loop.create_task(self._hang_up(g))
        g.tasks.add(task)
        task.add_done_callback(g.tasks.discard)
        if self._guests.get(g.name) is not g:
            return  # a launch that failed, or one already let go of
        del self._guests[g.name]
        log.info("qemu.exited", vm=g.name, pid=g.pid, returncode=code)
        if not self._closed:
            self._emit(VmExited(g.name, g.pid, code))

    async def _hang_up(self, g: _Guest) -> None:
        client, g.client = g.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 2.0)

    def _kill(self, g: _Guest) -> None:
        if g.proc is not None:
            # Our child leads its own session: whatever it forked goes with it (a
            # "QEMU" that forks and exits at once leaves nothing running).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(g.pid, signal.SIGKILL)
        if g.exited:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if g.pidfd >= 0:
                signal.pidfd_send_signal(g.pidfd, signal.SIGKILL)
            else:
                os.kill(g.pid, signal.SIGKILL)
        if g.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                g.proc.wait(2.0)

    # ------------------------------------------------------------------ QMP
    async def _client(self, g: _Guest) -> QMPClient:
        """The guest's QMP connection; made again if it broke while QEMU lives."""
        if g.client is not None and g.client.runstate == Runstate.RUNNING:
            return g.client
        await self._hang_up(g)
        if g.exited:
            raise RuntimeError(f"{g.name}: QEMU has exited")
        await self._greeted(g, ATTACH_TIMEOUT, None)
        assert g.client is not None
        return g.client

    async def _execute(self, g: _Guest, command: str,
                       arguments: dict[str, Any] | None = None,
                       deadline: float | None = None) -> dict[str, Any]:
        timeout = COMMAND_TIMEOUT
        if deadline is not None:
            timeout = min(timeout, deadline - self._loop.time())
            if timeout <= 0:
                raise RuntimeError(f"QMP {command}: no time left")
        client = await self._client(g)
        try:
            value = await asyncio.wait_for(client.execute(command, arguments or None),
                                           timeout)
        except ExecuteError as exc:
            raise RuntimeError(f"QMP {command}: {exc.error_class}: {exc}") from None
        except TimeoutError:
            raise RuntimeError(f"QMP {command}: no answer within {timeout:g} s") from None
        except (QMPError, OSError, EOFError) as exc:
            raise RuntimeError(f"QMP {command}: the connection broke "
                               f"({type(exc).__name__})") from None
        if value is None:
            return {}
        if not isinstance(value, dict):
            return {"return": value}
        return value

    async def _balloon_actual(self, g: _Guest, deadline: float | None = None) -> int | None:
        try:
            actual = (await self._execute(g, "query-balloon", deadline=deadline)).get("actual")
        except RuntimeError:
            return None  # no balloon device: the guest runs, its balloon is unknown
        return actual if type(actual) is int and actual >= 0 else None

    async def _command(self, r: VmCommand) -> dict[str, Any]:
        if r.command not in COMMANDS:
            raise RuntimeError(f"QMP command {r.command[:40]!r} is not one pd-vmm sends")
        g = self._guests.get(r.name)
        if g is None or g.exited:
            raise RuntimeError(f"{r.name}: no QEMU running here")
        if r.command == "quit":
            with contextlib.suppress(RuntimeError):  # QEMU may hang up before answering
                await self._execute(g, "quit")
            self._loop.call_later(QUIT_GRACE, self._kill, g)
            return {}
        value = await self._execute(g, r.command, dict(r.arguments))
        if r.command == "balloon":
            return {"actual": await self._balloon_actual(g)}
        return value

    # ------------------------------------------------------------------ attach, remove
    async def _attach(self, r: AttachVm) -> dict[str, Any]:
        g = self._guests.get(r.name)
        if g is not None and not g.exited and g.pid == r.pid:
            status = await self._execute(g, "query-status")
            return {"alive": True, "status": status.get("status"), "audit_qmp": g.audit}
        if g is not None and not g.exited:
            # Known here with another pid (the core restarted): that one is the guest.
            raise RuntimeError(f"{r.name}: runs here as pid {g.pid}, not {r.pid}")
        qmp = str(self._inside(r.qmp, "QMP socket"))
        if type(r.pid) is not int or r.pid <= 1:
            raise RuntimeError(f"no process {str(r.pid)[:20]}")
        g = _Guest(r.name, r.pid, qmp, str(Path(qmp).with_name(r.name + AUDIT_SUFFIX)),
                   None)
        self._watch(g)  # the pidfd first: the process checked is the one held
        why = "process has exited" if g.exited else _alive(r.pid, qmp)
        if why is not None:
            self._unwatch(g)
            raise RuntimeError(why)
        deadline = self._loop.time() + ATTACH_TIMEOUT + COMMAND_TIMEOUT
        try:
            await self._greeted(g, ATTACH_TIMEOUT, None)
            status = await self._execute(g, "query-status", deadline=deadline)
            actual = await self._balloon_actual(g, deadline)
        except BaseException as exc:
            # It is this guest's QEMU but does not answer: it is killed, not left running
            # unmanaged (pd-vmm records it lost, and a start must not find it there).
            self._kill(g)
            self._unwatch(g)
            await self._hang_up(g)
            if isinstance(exc, Exception):
                raise RuntimeError(f"pid {r.pid} did not answer on QMP ({exc}): "
                                   "killed") from None
            raise
        self._guests[r.name] = g
        log.info("qemu.reattached", vm=r.name, pid=r.pid)
        return {"alive": True, "status": status.get("status"), "actual": actual,
                "audit_qmp": g.audit}

    async def _remove(self, r: RemoveVmFiles) -> dict[str, Any]:
        if not NAME_RE.fullmatch(r.name):
            raise RuntimeError(f"bad guest name {r.name[:40]!r}")
        g = self._guests.get(r.name)
        if g is not None and not g.exited:
            raise RuntimeError(f"{r.name}: QEMU still runs (pid {g.pid})")
        images = {p.get("image") for p in ((self._config or {}).get("profiles") or {}).values()}
        paths = [self._inside(p, "file") for p in r.paths]
        paths += [self.vm_dir / f"{r.name}{s}" for s in (AUDIT_SUFFIX, ".log", ".env")]
        removed = 0
        for p in paths:
            if str(p.resolve()) in images:
                raise RuntimeError(f"{p.name}: a profile's image is never removed")
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed += 1
        return {"removed": removed}

    _HANDLERS: ClassVar[dict[type, Callable[[Any, Any], Coroutine[Any, Any, dict[str, Any]]]]] = {
        LoadHost: _load_host, MakeOverlay: _overlay, LaunchVm: _launch, AttachVm: _attach,
        VmCommand: _command, RemoveVmFiles: _remove}


def _served(path: Path) -> bool:
    """Whether a process listens on the UNIX socket ``path`` (a stale file left by a
    QEMU that is gone refuses the connection)."""
    if not path.is_socket():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.setblocking(False)
        try:
            s.connect(str(path))
        except BlockingIOError:
            return True  # the backlog is full: someone listens
        except OSError:
            return False
        return True
