"""The `specscope` command line: one Typer app; each command lives in its own module."""

from __future__ import annotations

import errno
import os
import re
import sys

import typer

from specscope import __version__
from specscope.names import visible

app = typer.Typer(
    name="specscope",
    help="Spectral structure of training: probe st(A) and nr(G) per weight, train with spectral "
    "optimizers, reproduce the published claims.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"specscope {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """specscope command line."""


def _register() -> None:
    # Importing a command module registers its commands on `app`.
    from specscope.cli import commands  # noqa: F401


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2 (SPECSCOPE_DEBUG=1 shows tracebacks)."""
    import json

    from pydantic import ValidationError

    from specscope.errors import SpecscopeError, allocation_failure
    from specscope.labs.config import tomllib

    import warnings

    warnings.showwarning = _warning_line
    _register()
    user_errors = (SpecscopeError, ValidationError, OSError, UnicodeDecodeError, json.JSONDecodeError,
                   tomllib.TOMLDecodeError)
    try:
        _check_path_options(sys.argv[1:])
        _check_repeated_options(sys.argv[1:])
        if not _help_or_version(sys.argv[1:]):  # neither does any work: a misspelt setting must not hide them
            _check_environment()
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except user_errors as e:
        if os.environ.get("SPECSCOPE_DEBUG"):
            raise
        typer.echo(f"error: {_one_line(e)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt as e:
        _interrupted(e)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as e:  # click usage errors come here in non-standalone mode
        if _is_click_exception(e) and not str(getattr(e, "message", "") or e) and not sys.argv[1:]:
            sys.exit(0)  # `specscope` alone: click printed the help (no_args_is_help), nothing is wrong
        if _is_click_exception(e):
            typer.echo(f"error: {_usage_line(e)}", err=True)  # one line, like every other user error
            sys.exit(e.exit_code)
        if _float_overflow(e) and not os.environ.get("SPECSCOPE_DEBUG"):
            typer.echo(f"error: a setting overflowed float32 in the training step ({_one_line(e)}): lower the learning "
                       "rate, or the other size or scale you raised, to one that float32 arithmetic holds", err=True)
            sys.exit(2)
        failed = allocation_failure(e)
        if failed is None or os.environ.get("SPECSCOPE_DEBUG"):
            raise
        typer.echo(f"error: out of memory: could not allocate {failed}; lower the sizes (the model's, the "
                   "batch's, or --set key=value) or use a machine with more memory", err=True)
        sys.exit(2)


def _float_overflow(e: Exception) -> bool:
    """torch's refusal of a Python number too large for a float32 scalar: a learning rate of 1e39, or one that
    Adam's bias correction (lr / (1 − β₁)) takes past 3.4e38."""
    return isinstance(e, RuntimeError) and "cannot be converted to type float without overflow" in str(e)


def _help_or_version(argv: list[str]) -> bool:
    """Whether the command line only asks for help or the version (no arguments prints the help too)."""
    return not argv or "--help" in argv or "--version" in argv


def _check_environment() -> None:
    """Settings read from the environment (specscope.settings), checked before any command starts work, without
    importing torch: `specscope --help` and a usage error stay instant."""
    from specscope import settings
    from specscope.errors import ConfigError

    try:
        settings.check_all()
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _usage_line(e) -> str:
    """click's usage error on one line, ending with where the command's options are listed. An unknown option
    gets the command's options whose names are close to it, or, where none is (click's guesses then include
    names that share nothing with it), every option of the command."""
    message = " ".join(e.format_message().split()).rstrip(".")
    ctx = getattr(e, "ctx", None)
    if type(e).__name__ == "NoSuchOption" and ctx is not None:
        message = _unknown_option(e.option_name, ctx.command)
    if message.startswith("Got unexpected extra argument") and ctx is not None:  # `--grid a=1,2 b=3,4`
        many = [o for p in ctx.command.params if getattr(p, "multiple", False) for o in getattr(p, "opts", []) if o.startswith("--")]
        if many:
            message += (f" (an option given several values takes one per flag: repeat {' or '.join(many)} before each, "
                        f"e.g. `{many[0]} A {many[0]} B`)")
    sub = [a for a in sys.argv[1:2] if not a.startswith("-")]
    command = ctx.command_path if ctx is not None else " ".join(["specscope", *sub])
    return f"{message}; see `{command} --help`"


def _unknown_option(name: str, command) -> str:
    import difflib

    options = sorted({o for p in command.params for o in getattr(p, "opts", []) if o.startswith("--")})
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.7)
    if close:
        return f"No such option: {name} (did you mean {' or '.join(close)}?)"
    return f"No such option: {name} (the options: {', '.join(options)})" if options else f"No such option: {name}"


def _is_click_exception(e: Exception) -> bool:
    """Usage errors (unknown option, missing argument): click's ClickException, or typer's vendored copy
    (typer ≥ 0.24 ships click as `typer._click`)."""
    classes = []
    for module in ("click", "typer._click"):
        try:
            classes.append(__import__(module, fromlist=["ClickException"]).ClickException)
        except ImportError:
            pass
    return isinstance(e, tuple(classes))


def _interrupted(e: KeyboardInterrupt) -> None:
    """Ctrl-C: say so, with the resume command when a run was interrupted, and exit 130. A further Ctrl-C during
    the interpreter's exit is ignored (it would interrupt the exit handlers with a traceback): the first exit
    handler to run, registered last, ignores it — nothing changes for a caller that catches the SystemExit."""
    import atexit
    import signal

    atexit.register(signal.signal, signal.SIGINT, signal.SIG_IGN)
    typer.echo(f"interrupted: {e}" if str(e) else "interrupted", err=True)
    sys.exit(130)


def interruptible(fn):
    """Run a command body so that Ctrl-C prints its message (typer would turn it into a silent exit 130)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as e:
            _interrupted(e)

    return wrapper


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (e.g. what --salvage skipped) as one line on stderr, without the source line."""
    typer.echo(f"warning: {' '.join(str(message).split())}", err=True)


_OS_FIXES = {
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of this path is a file, not a folder: give a folder (--out / --root)",
    errno.EISDIR: "this is a folder: give a file",
    errno.EEXIST: "a file is in the way: give a folder (new, or one that holds no such file)",
    errno.EACCES: "no permission: {elsewhere}, or change its permissions",
    errno.EPERM: "no permission: {elsewhere}, or change its permissions",
    errno.EROFS: "read-only file system: {elsewhere}",
    errno.ENOSPC: "the disk is full: free space, or {elsewhere}",
}
_ELSEWHERE = {"claims": "give --into a file on a writable disk",  # where each command can write instead
              "report": "copy the run directory to a writable disk and report the copy"}


def _elsewhere() -> str:
    """How the command being run can write somewhere else: its --out, or what stands for it."""
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
    if "--resume" in sys.argv[1:]:  # a resume writes into its run (or sweep): --out does not apply
        return "copy the run (or sweep) directory to a writable disk and resume the copy"
    return _ELSEWHERE.get(command, "write elsewhere (--out)")


PATH_OPTIONS = {"--out": "runs", "--root": "runs", "--into": "README.md", "--resume": "runs/LAB/RUN_ID",
                "--config": "lab.toml"}  # each with an example of what it takes


def _check_path_options(argv: list[str]) -> None:
    """An empty path (`--out ''`) would silently mean the current folder: refused, naming the option."""
    from specscope.errors import ConfigError

    files = next((a for a in argv if not a.startswith("-")), "") == "export"  # export's --out is a file
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in PATH_OPTIONS and (value.strip() == "" if eq else i + 1 < len(argv) and argv[i + 1].strip() == ""):
            example = "run.csv" if files and name == "--out" else PATH_OPTIONS[name]
            raise ConfigError(f"{name} is empty; give a path (e.g. {name} {example}), or leave the option out")


def _check_repeated_options(argv: list[str]) -> None:
    """An option that takes one value given twice (`--config a.toml --config b.toml`): click keeps the last and drops
    the rest without a word — every key of the first file, here. Refused, naming the option; options given several
    values (`--set`, `--grid`) and flags are not affected."""
    from specscope.errors import ConfigError

    args = argv[: argv.index("--")] if "--" in argv else argv
    if "--help" in args:
        return
    command = typer.main.get_command(app)  # typer's own click: its classes are not the installed click's
    for arg in args:  # the subcommand named on the line, through groups
        if hasattr(command, "list_commands") and not arg.startswith("-"):
            command = command.get_command(None, arg) or command
    for param in command.params:
        if getattr(param, "param_type_name", "") != "option" or param.multiple or param.is_flag or param.count:
            continue
        given = [opt for a in args for opt in param.opts + param.secondary_opts if _names(a, opt)]
        if len(given) > 1:
            raise ConfigError(f"{given[0]} is given {len(given)} times; it takes one value (only the last would be used): "
                              "give it once" + (" and the other keys with --set KEY=VALUE" if "--config" in param.opts else ""))


def _names(arg: str, opt: str) -> bool:
    """Whether the command-line token `arg` gives option `opt`: `--out`, `--out=x`, `-o` or `-ox` (a short option's
    value attached, as click reads it)."""
    if arg == opt or arg.startswith(opt + "="):
        return True
    return len(opt) == 2 and not opt.startswith("--") and arg.startswith(opt) and not arg.startswith("--")


def _one_line(e: BaseException) -> str:
    """The message of a user error on one line; an OSError says which file and what went wrong."""
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        return _validation_line(e)
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        fix = _OS_FIXES.get(e.errno, "").format(elsewhere=_elsewhere())
        text = f"{e.filename}: {e.strerror}" + (f" (-> {e.filename2})" if e.filename2 else "") + (f"; {fix}" if fix else "")
    else:
        text = str(e)
    return _flat(text) or type(e).__name__


def _flat(text: str) -> str:
    """One line: a wrapped message's line breaks (a newline and its indent) become one space, runs of spaces one;
    any other control character — a newline or tab inside a path or name — is shown escaped, never lost."""
    text = re.sub(r"[ \t]*\n[ \t]+|[ \t]+\n[ \t]*", " ", text.strip())
    return visible(re.sub(" {2,}", " ", text))


def _validation_line(e) -> str:
    parts = [f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
    return "invalid config: " + "; ".join(parts)


def stdout_console():
    """The console tables print to: the terminal's, or, when the output is piped or captured (where the
    width rich guesses is 80), 160 columns, so short columns are not squeezed into broken words."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 160))
