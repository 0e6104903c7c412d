"""The ``ppn`` command's entry point: ``ppn vm ...`` runs without the rest of ``ppn``.

Scripts call ``ppn vm list`` and ``ppn vm create --start`` in loops, and a guest starts
in ~60 ms: loading the node's runtime (the kernel, pyroute2, structlog, the event
catalog) for a command that only asks the running node would cost several times that.
Everything else goes to :func:`actors.cli.main`.
"""

from __future__ import annotations

import sys


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["vm"]:
        from actors.vm_cli import main as vm_main
        return vm_main(argv)
    from actors.cli import main as full_main
    return full_main()


if __name__ == "__main__":
    sys.exit(main())
