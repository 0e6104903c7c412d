"""How a ``ppn`` command ends, for the full CLI and the light ``ppn vm`` alike: exit 0
done, 1 refused (one line saying why), 2 a bug (one line; ``--debug`` or PPN_DEBUG=1
adds the traceback), 130 interrupted; never a traceback otherwise."""

from __future__ import annotations

import argparse
import os
import sys
import traceback


def one_line(exc: BaseException, limit: int = 800) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def run(args: argparse.Namespace, refusals: tuple[type[BaseException], ...]) -> int:
    """Run ``args.func(args)``; an exception of ``refusals`` is the command's refusal."""
    try:
        code: int = args.func(args)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("ppn: interrupted", file=sys.stderr)
        return 130
    except refusals as exc:
        print(f"ppn: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: one line, never a traceback unless asked for
        what = " ".join(filter(None, (getattr(args, "area", None), getattr(args, "cmd", None))))
        print(f"ppn: internal error in `ppn {what}`: {type(exc).__name__}: {one_line(exc)} "
              "(this is a bug; run `ppn --debug ...` for the traceback)", file=sys.stderr)
        if getattr(args, "debug", False) or os.environ.get("PPN_DEBUG") == "1":
            traceback.print_exc()
        return 2
    return code
