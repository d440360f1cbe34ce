"""`python -m dpo_cli` and the `dpo-cli` console script: the CLI, with Ctrl-C and SIGTERM handled from the start.

The handler goes in before any other import of ours (typer alone takes a few hundred milliseconds; even `threading`
takes milliseconds), so an interrupt that early ends like any other: "error: interrupted", exit 130, not a
KeyboardInterrupt traceback. Only an interrupt during Python's own start-up, before this file runs, is Python's:
SIGTERM then ends the process by the signal (exit 143 in a shell), SIGINT with Python's message. Once the command
has ended, the signals are ignored: the interpreter's teardown (a second or so with torch loaded) puts the default
handlers back, and a late SIGTERM there killed the process with 143 after it had decided on 130 or 0.
"""

try:  # an interrupt before the handler is in place is caught here, so no line of ours shows in a traceback
    from dpo_cli.run import interrupts  # imports only `signal`

    interrupts.install()
except KeyboardInterrupt:
    exec("pass")  # see interrupts.exit_interrupted, which may not be imported yet
    print("error: interrupted", file=__import__("sys").stderr)
    raise SystemExit(130) from None


def run() -> None:
    try:
        from dpo_cli.cli import main

        main()
    except KeyboardInterrupt:  # between the handler and main()'s own handling of it
        interrupts.exit_interrupted()
    finally:
        interrupts.ignore()  # the exit code is decided: a signal during the teardown must not make it 143


if __name__ == "__main__":
    run()
