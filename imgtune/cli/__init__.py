"""The command line: thin commands that turn options into keyword arguments for the library.

One module per command group (train, deploy, explain, curate, data); this one holds the ``imgtune``
group and its error handling. Errors a user can fix print one line to stderr and exit 1 (2 for usage
errors); ``--debug`` shows the traceback too. The library is imported inside each command, so
``--help``, usage errors and ``imgtune datasets`` never import torch.
"""

from __future__ import annotations

import re
import sys
import traceback

import click

from imgtune import __version__
from imgtune.cli import curate, data, deploy, explain, train
from imgtune.errors import ImgtuneError


class ImgtuneGroup(click.Group):
    """Turns every error into one line on stderr and an exit status, as a user expects of a tool."""

    def invoke(self, ctx: click.Context):
        """Run the command; with ``--debug``, print the traceback of an error before :meth:`main` reports it.
        A library error names the parameters to set: here they become the command's options."""
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.Abort, click.exceptions.Exit):
            raise
        except Exception as error:
            if ctx.params.get("debug"):
                traceback.print_exc()
            if isinstance(error, ImgtuneError):
                command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else self
                raise click.ClickException(with_flags(str(error), command)) from error
            raise

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        try:
            code = super().main(args, prog_name=prog_name or "imgtune", complete_var=complete_var,
                                standalone_mode=False, **extra)
        except click.UsageError as error:
            hint = f" (see '{error.ctx.command_path} --help')" if error.ctx else ""
            _fail(f"{error.format_message()}{hint}", 2)
        except click.Abort:
            _fail("interrupted", 130)
        except click.ClickException as error:
            _fail(error.format_message(), error.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as error:  # a bug: still one line, unless --debug
            lost = _lost_peer_message(error)
            if lost:
                _fail(lost, 1)
            _fail(f"internal error: {type(error).__name__}: {error} (run with --debug for the traceback)", 1)
        sys.exit(code if isinstance(code, int) else 0)


#: Library parameters whose option has another name.
FLAG_ALIASES = {"time_column": "--time-col"}
_PARAMETER = re.compile(r"`(\w+)(?:=([^`]*))?`")


def with_flags(message: str, command: click.Command) -> str:
    """A library message as the command line says it: the parameters it names in backticks become the
    options that set them (`valid_pct` -> --valid-pct, `overwrite=True` -> --overwrite, `bs=2` -> --bs 2).

    Args:
        message: the text of an :class:`~imgtune.errors.ImgtuneError`.
        command: the command whose options (and :data:`FLAG_ALIASES`) name the parameters; a group's
            are those of its commands.

    Returns:
        The message; a name in backticks that no option sets is left as it is.
    """
    flags = {**_option_flags(command), **FLAG_ALIASES}

    def flag(match: re.Match) -> str:
        name, value = match.groups()
        if name not in flags:
            return match.group(0)
        return flags[name] if value in (None, "True") else f"{flags[name]} {value}"

    return _PARAMETER.sub(flag, message)


def _option_flags(command: click.Command) -> dict[str, str]:
    """Parameter name -> its long option, for ``command`` or every command of a group."""
    if isinstance(command, click.Group):
        return {name: flag for sub in command.commands.values() for name, flag in _option_flags(sub).items()}
    return {param.name: next(o for o in param.opts if o.startswith("--"))
            for param in command.params if isinstance(param, click.Option)}


def _lost_peer_message(error: Exception) -> str | None:
    """Under torchrun: another process died or hung. Only a command that trained loaded the distributed
    module, and only then can there be a process group, so an error elsewhere never imports torch here."""
    distributed = sys.modules.get("imgtune.train.distributed")
    return distributed.lost_peer_message(error) if distributed else None


def _fail(message: str, code: int) -> None:
    click.secho(f"imgtune: error: {message}", fg="red", err=True)
    sys.exit(code)


@click.group(cls=ImgtuneGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="imgtune")
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
def cli(debug: bool) -> None:
    """imgtune: fine-tune an ImageNet-pretrained network on your labelled images, offline, on one machine."""


for command in (train.train, train.lr_find, deploy.predict, deploy.export, deploy.serve, explain.interpret,
                curate.download, curate.doctor, curate.clean, data.datasets, data.cache_group, data.render):
    cli.add_command(command)


def main() -> None:
    """The ``imgtune`` console script."""
    cli.main()
