"""What the command-line modules share (`cca_jax/generate/cli.py`, `train/*/cli.py`).

Each command line is a thin module: its `main(argv)` parses argv with argparse into the frozen
job dataclass of a library module and calls that module's `run(job)`; the work, and every
check of the input, is the library's. The pieces they have in common are here: a parser whose
`prog` is `python -m MODULE`, a help formatter that shows a default only where the help does
not already say it, the job's defaults for the parser, the job built from the parsed
arguments, the command line as typed, and the one-line `error: ...` report of bad input (exit
code 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
from typing import TypeVar

from cca_jax.config import parse_layer_indices

Job = TypeVar("Job")


# Help formatters: every default shown, or only those the help text does not already say.
ALL_DEFAULTS = argparse.ArgumentDefaultsHelpFormatter


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where the help text does not already say it and it is set."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default is None or \
                action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def parser(module: str, doc: str, formatter_class=argparse.HelpFormatter,
           job: type | None = None) -> argparse.ArgumentParser:
    """The parser of `python -m MODULE`. Its description is the first paragraph of `doc`, the
    command-line module's docstring: the command is described in one place. With a `job`
    dataclass, a flag added without a default takes that of the job's field of the same name
    (a tuple as a list, as argparse gives it): each default is written once, in the job."""
    description = " ".join(doc.strip().split("\n\n")[0].split())
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=description,
                                formatter_class=formatter_class)
    if job is not None:
        p.set_defaults(**{name: list(value) if isinstance(value, tuple) else value
                          for name, value in vars(defaults(job)).items()})
    return p


def layer_indices_argument(text: str) -> tuple[int, ...]:
    """`cca_jax.config.parse_layer_indices` as an argparse `type=` ("3,11", "none"): argparse
    names the flag in its error."""
    try:
        return parse_layer_indices(text, flag=None)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def defaults(job_type: type) -> types.SimpleNamespace:
    """The defaults of `job_type`'s fields (those that have one), by name: a parser takes its
    defaults from here, so that each is written once, in the job."""
    return types.SimpleNamespace(**{f.name: f.default for f in dataclasses.fields(job_type)
                                    if f.default is not dataclasses.MISSING})


def job_from(arguments: argparse.Namespace, job_type: type[Job], **fields) -> Job:
    """A `job_type` whose every field is the parsed argument of the same name (argparse's
    `dest`), except those given in `fields`; the job checks them (its errors name the flags)."""
    values = {f.name: getattr(arguments, f.name) for f in dataclasses.fields(job_type)
              if f.init and hasattr(arguments, f.name)}
    return job_type(**{**values, **fields})


def command_line(module: str, argv: list[str] | None) -> str:
    """`python -m MODULE ARGS` as typed (`argv` None: this process's own arguments)."""
    return f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv)


def usage_error(error: BaseException, code: int = 2) -> int:
    """Report `error` in one line on stderr (`error: ...`); return the exit code for it (bad
    input: 2)."""
    print(f"error: {error}", file=sys.stderr)
    return code
