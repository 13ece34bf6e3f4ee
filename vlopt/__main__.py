"""The `vlopt` script and `python -m vlopt`.

Ctrl-C while the command line is still being imported (typer, pydantic: up to a second on a busy
machine) would otherwise end in Python's KeyboardInterrupt traceback; nothing is written that early,
so it ends the process at once with the same line and exit code as later. `vlopt.cli.main` installs
the handling for the rest of the run.
"""

import os
import signal
import sys


def _interrupted_while_starting(signum, frame):
    sys.stderr.write("vlopt: interrupted\n")
    sys.stderr.flush()
    os._exit(130)


def main() -> int:
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    from vlopt.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
