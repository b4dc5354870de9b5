"""The `lit-ddpm` command: fit, validate and test through LightningCLI (`commands`), `sample`, `distill`, `ema`.

`main` imports the command's modules itself (torch and Lightning take seconds to load), so that Ctrl-C at any
moment is one line and exit status 130."""

import os
import signal
import sys
import threading

INTERRUPTED = "lit-ddpm: interrupted (Ctrl-C)"


def _exit_at_once(signal_number: int, frame) -> None:
    """Ctrl-C while the modules load: nothing is written yet, so leave at once. A KeyboardInterrupt raised in
    the middle of a library's import would unwind through that library's half-set-up state (and its exit
    handlers could then fail with a traceback of their own)."""
    os.write(2, f"\n{INTERRUPTED}\n".encode())
    os._exit(130)


def main(args: list[str] | None = None) -> None:
    """Entry point of `lit-ddpm`; `args` replaces sys.argv[1:] (for tests)."""
    main_thread = threading.current_thread() is threading.main_thread()  # only it can set handlers
    previous = signal.getsignal(signal.SIGINT)
    try:
        if main_thread:
            signal.signal(signal.SIGINT, _exit_at_once)
        from diffusion_lit.cli.commands import main as run
    except KeyboardInterrupt:  # before the handler above was installed
        print(f"\n{INTERRUPTED}", file=sys.stderr)
        sys.exit(130)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    run(args)


__all__ = ["main"]
