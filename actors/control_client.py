"""The control socket's client side, light enough for a command that only asks.

``ppn vm ...`` (which scripts call in loops) and the client half of every other command
use this: it needs json and a socket, not the node's runtime.  The server side and the
request decoding are in :mod:`actors.control`, which re-exports these names.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

SOCKET_NAME = "control.sock"
MAX_REPLY = 16 << 20


class ControlError(Exception):
    """A control request failed; the message says why, for the person at the console."""


class NodeNotRunning(ControlError):
    """No node answers on this state directory's control socket (none, or a stale one)."""


class RequestError(ControlError):
    """The request itself is malformed: not JSON, too large, an unknown command or field."""


def encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=repr).encode() + b"\n"


def request(state_dir: str | os.PathLike[str], obj: dict[str, Any], timeout: float = 10.0
            ) -> Any:
    """Send one request to the node on ``state_dir``; its result, or ControlError."""
    path = os.path.join(os.fspath(state_dir), SOCKET_NAME)  # (no pathlib: see above)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise NodeNotRunning(f"the node is not running (no control socket at {path}); "
                                 f"start it with: ppn node run --state-dir {state_dir}"
                                 ) from None
        except ConnectionRefusedError:
            raise NodeNotRunning(f"the node is not running ({path} is stale: nothing "
                                 "listens on it)") from None
        except PermissionError:
            raise ControlError(f"{path}: permission denied (the socket is for the node's "
                               "owner only)") from None
        try:
            sock.sendall(encode(obj))
            with sock.makefile("rb") as reader:
                line = reader.readline(MAX_REPLY + 1)
        except TimeoutError:
            raise ControlError(f"no reply from the node within {timeout:g} s") from None
        except OSError as exc:  # a broken pipe here is the node's, not our stdout's
            raise ControlError(f"the node closed the connection ({exc.strerror or exc}); "
                               "the command did not happen") from None
    if not line.endswith(b"\n"):
        raise ControlError("the node closed the connection without a complete reply")
    try:
        reply = json.loads(line)
    except ValueError:
        raise ControlError(f"malformed reply from the node: {line[:200]!r}") from None
    if not isinstance(reply, dict) or not reply.get("ok"):
        error = reply.get("error") if isinstance(reply, dict) else None
        raise ControlError(str(error or f"malformed reply {line[:200]!r}"))
    return reply.get("result")
