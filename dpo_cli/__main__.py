"""`python -m dpo_cli` and the `dpo-cli` console script: the CLI, with Ctrl-C and SIGTERM handled from the start.

The handler goes in before the command line's own imports (typer alone takes a few hundred milliseconds), so an
interrupt that early ends like any other: "error: interrupted", exit 130, not a KeyboardInterrupt traceback.
"""

import sys


def run() -> None:
    from dpo_cli.run import interrupts

    interrupts.install()
    try:
        from dpo_cli.cli import main
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
