"""`python -m dpo_cli` and the `dpo-cli` console script: the CLI, with Ctrl-C and SIGTERM handled from the start.

The handler goes in before the command line's own imports (typer alone takes a few hundred milliseconds), so an
interrupt that early ends like any other: "error: interrupted", exit 130, not a KeyboardInterrupt traceback. Once the
command has ended, the signals are ignored: the interpreter's teardown (a second or so with torch loaded) puts the
default handlers back, and a late SIGTERM there killed the process with 143 after it had decided on 130 or 0.
"""

import sys


def run() -> None:
    from dpo_cli.run import interrupts

    interrupts.install()
    try:
        try:
            from dpo_cli.cli import main
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)
        main()
    finally:
        interrupts.ignore()  # the exit code is decided: a signal during the teardown must not make it 143


if __name__ == "__main__":
    run()
