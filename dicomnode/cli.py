"""The `dicomnode` command line.

Subcommands live in their own modules and are imported only when run, so that
`dicomnode --help` or `dicomnode jobs list` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from dicomnode import __version__
from dicomnode.errors import DicomnodeError

# name -> (module:attribute of a click command, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("dicomnode.commands.synth:synth", "Write synthetic breast screening studies."),
    "inspect": ("dicomnode.commands.inspect:inspect", "Show what loads from DICOM files."),
    "export": ("dicomnode.commands.export:export",
               "Write a de-identified training set (images, results, labels)."),
    "import": ("dicomnode.commands.importing:import_",
               "Index DICOM files on disk into the archive, as if received."),
    "serve": ("dicomnode.commands.node:serve", "Receive studies over DICOM into the archive."),
    "worker": ("dicomnode.commands.node:worker", "Run inference on ready studies, send results."),
    "run": ("dicomnode.commands.node:run", "Receive, infer and send in one process."),
    "status": ("dicomnode.commands.status:status",
               "Node, queue, deliveries, disk, model and device at a glance."),
    "jobs": ("dicomnode.commands.jobs:jobs", "List, show, retry or cancel inference jobs."),
    "db": ("dicomnode.commands.db:db", "Database schema maintenance."),
    "dicomweb": ("dicomnode.commands.dicomweb:dicomweb",
                 "DICOMweb helpers: hash a bearer token, STOW-RS files to a server."),
    "bench": ("dicomnode.commands.bench:bench", "Benchmarks (model, store, ...)."),
    "retrieve": ("dicomnode.commands.retrieve:retrieve",
                 "Fetch the studies a labels CSV names from a PACS into the archive."),
    "train": ("dicomnode.commands.train:train", "Train a model on labelled images."),
    "tune": ("dicomnode.commands.tune:tune", "Random hyperparameter search (paper V-D.6)."),
    "evaluate": ("dicomnode.commands.evaluate:evaluate", "AUC, localisation and a report."),
    "demo": ("dicomnode.commands.demo:demo", "The node end to end on a synthetic study."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attr = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in sorted(COMMANDS)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="dicomnode")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML configuration file (else $DICOMNODE_CONFIG, else defaults).")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, log_level: str) -> None:
    """dicomnode: a DICOM node that runs 3D-GMIC on breast imaging studies."""
    from dicomnode.ops.logs import configure_logging

    configure_logging(log_level.upper())
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path


def load_cli_config(ctx: click.Context):
    """The Config for this invocation (file from --config or $DICOMNODE_CONFIG, then env)."""
    from dicomnode.config import load_config

    root = ctx.find_root()
    if "config" not in root.obj:
        root.obj["config"] = load_config(root.obj.get("config_path"))
    return root.obj["config"]


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="dicomnode", standalone_mode=False)
    except DicomnodeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(2 if isinstance(exc, click.UsageError) else 1)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        logging.getLogger("dicomnode").warning("event=interrupted")
        sys.exit(130)
    sys.exit(0)


if __name__ == "__main__":
    main()
