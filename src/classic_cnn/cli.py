"""The ``cnn`` command: thin wiring of the library, no logic of its own.

Only light modules are imported at start-up so that ``cnn --help`` answers at once; commands
import what they need when they run.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    help="classic-cnn: train, test, predict with and look inside a classic CNN built on NumPy.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def version() -> None:
    """Print the installed version."""
    from . import __version__

    typer.echo(f"classic-cnn {__version__}")


@app.command()
def demo() -> None:
    """Train the default network on the default dataset, test it and show results."""
    typer.echo(
        "cnn demo: not yet — training on datasets arrives with the application (data, fit, "
        "test). The engine is ready: see README.md for the Python example."
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
