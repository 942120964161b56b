"""Command-line interface: a thin click layer over the library.

Every command: ``--help`` with an example, ``--device auto|cpu|cuda``, ``--seed``; bad input prints
one line ``ctrecon: error: ...`` on stderr and exits 2 with no traceback and no partial output.
Set ``CTRECON_DEBUG=1`` to see tracebacks of unexpected errors.
"""
from __future__ import annotations

import functools
import os
import sys

import click

from .errors import InputError

EXIT_BAD_INPUT = 2


def _fail(message: str, code: int = EXIT_BAD_INPUT):
    click.echo(f"ctrecon: error: {message}", err=True)
    sys.exit(code)


def common_options(func):
    """``--device`` and ``--seed`` for every command."""

    @click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
                  help="Where to compute.")
    @click.option("--seed", default=0, show_default=True, type=int, help="Random seed.")
    @functools.wraps(func)
    def wrapper(*args, device, seed, **kwargs):
        import torch

        from ._backend import resolve_device

        torch.manual_seed(seed)
        return func(*args, device=resolve_device(device), seed=seed, **kwargs)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ctrecon")
def cli():
    """ctrecon: sparse-view cone-beam CT reconstruction with pretrained Gaussian priors.

    \b
    Example:
      ctrecon simulate data/sample_abdomen.nii.gz --views 120 --out scan.npz
      ctrecon fdk scan.npz --out fdk.nii.gz
    """


def main(argv=None):
    """Console entry point: maps bad input to exit code 2 with a one-line message."""
    try:
        cli.main(args=argv, prog_name="ctrecon", standalone_mode=False)
    except click.exceptions.Abort:
        _fail("interrupted", 130)
    except click.ClickException as err:
        if isinstance(err, click.UsageError) and err.ctx is not None:
            click.echo(err.ctx.get_usage(), err=True)
        _fail(err.format_message(), err.exit_code if err.exit_code else EXIT_BAD_INPUT)
    except (InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        _fail(str(err) if not isinstance(err, OSError) or not err.filename else f"{err.strerror}: {err.filename}")
    except ValueError as err:  # geometry and array validation raise ValueError naming the field
        _fail(str(err))
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as err:  # noqa: BLE001 - last resort: one line unless debugging
        if os.environ.get("CTRECON_DEBUG"):
            raise
        _fail(f"internal error ({type(err).__name__}): {err}; set CTRECON_DEBUG=1 for the traceback", 1)
    sys.exit(0)


if __name__ == "__main__":
    main()
