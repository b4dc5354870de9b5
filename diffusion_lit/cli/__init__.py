"""The `lit-ddpm` command: fit, validate and test through LightningCLI (`commands`), `sample`, `distill`, `ema`.

`main` imports the command's modules itself (torch and Lightning take seconds to load), so that Ctrl-C at any
moment is one line and exit status 130."""

import sys


def main(args: list[str] | None = None) -> None:
    """Entry point of `lit-ddpm`; `args` replaces sys.argv[1:] (for tests)."""
    try:
        from diffusion_lit.cli.commands import main as run
    except KeyboardInterrupt:
        print("\nlit-ddpm: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    run(args)


__all__ = ["main"]
