"""The `rabbit-replay` command (its commands arrive with the replay work; see README.md)."""

import typer

app = typer.Typer(
    name="rabbit-replay",
    help="Find, inspect and republish archived messages.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """Find, inspect and republish archived messages."""
