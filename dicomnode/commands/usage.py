"""Usage errors (a missing or bad option) print as one line, ``error: <what> (see
'dicomnode <command> --help')``, and exit with status 2, as configuration errors do."""

from __future__ import annotations

import click


class OneLineUsageError(click.UsageError):
    def show(self, file=None) -> None:  # noqa: ANN001 - click's signature
        click.echo(f"error: {self.format_message()}", file=file, err=True)


class OneLineCommand(click.Command):
    """A command whose usage errors (missing or bad options) print as one line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except OneLineUsageError:
            raise
        except click.UsageError as exc:
            message = " ".join(exc.format_message().split())  # click wraps choices
            raise OneLineUsageError(f"{message} (see '{ctx.command_path} --help')") from None
