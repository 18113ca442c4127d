"""The ``mergecli`` program's entry point: signal handlers first, then the command line.

Until the CLI's own handlers are in place (``mergecli.cli.main``), Ctrl-C, SIGTERM and SIGHUP
end the process at once with one line: nothing has been written yet.
"""

from __future__ import annotations

import os
import signal
import sys

STARTUP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _exit_at_startup(signum: int, _frame: object) -> None:
    sys.stderr.write(f"interrupted ({signal.Signals(signum).name}) before starting\n")
    os._exit(128 + signum)


def main() -> None:
    for signum in STARTUP_SIGNALS:
        signal.signal(signum, _exit_at_startup)
    from mergecli import cli

    cli.main()
