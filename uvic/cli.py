"""One error style for every command (train.py, sample.py, eval_fid.py, python -m uvic.latents / analysis /
sweep / doctor).

An expected error (bad input, a missing, unreadable or corrupt file, a full disk) prints one line

    PROG: error: WHAT (the file or value) and what to do

and exits with status 2. `--debug` on the command line (or UVIC_DEBUG=1) shows the traceback instead.
Anything else is a bug and keeps its traceback.

    @command("sample.py")
    def main(argv): ...           # main(None) reads sys.argv; main([...]) in tests
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import sys
import zipfile
from typing import Callable, List, Optional, Sequence

EXIT_USAGE = 2
DEBUG_ENV = "UVIC_DEBUG"
DEBUG_FLAG = "--debug"
DEBUG_HELP = f"show the traceback of an error (also {DEBUG_ENV}=1)"


class UserError(Exception):
    """A fault the user can fix; its message names the file or value and says what to do."""


def expected_errors() -> tuple:
    """The exception types that mean bad input or a faulty file / disk, not a bug (imported lazily)."""
    types: List[type] = [UserError, ValueError, OSError, EOFError, zipfile.BadZipFile, json.JSONDecodeError]
    for module, name in (("PIL", "UnidentifiedImageError"), ("safetensors", "SafetensorError"),
                         ("omegaconf.errors", "OmegaConfBaseException"), ("yaml", "YAMLError"),
                         ("pickle", "UnpicklingError")):
        try:
            types.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(types)


_OS_HINTS = {
    errno.ENOSPC: "disk full: {path}; free space there or write elsewhere, then rerun the same command (it resumes)",
    errno.EDQUOT: "disk quota exceeded: {path}; free space there or write elsewhere, then rerun the same command",
    errno.EACCES: "permission denied: {path}; choose a path you can write to or fix its permissions",
    errno.EPERM: "permission denied: {path}; choose a path you can write to or fix its permissions",
    errno.EROFS: "read-only file system: {path}; write elsewhere",
    errno.EEXIST: "{path} exists and is in the way (a file where a folder is needed?); remove it or choose another path",
    errno.ENOTDIR: "{path}: a part of this path is a file, not a folder; choose another path",
    errno.EISDIR: "{path} is a folder where a file is needed; give a file path",
    errno.ENOENT: "{path} does not exist; check the path",
}


def describe(err: BaseException) -> str:
    """The one-line message of an expected error."""
    if isinstance(err, OSError) and err.errno in _OS_HINTS:
        path = err.filename if err.filename is not None else "(path unknown)"
        text = str(err)
        if err.errno == errno.ENOSPC or text.startswith("[Errno"):  # the bare library text: say what it means
            return _OS_HINTS[err.errno].format(path=path)
        return text
    name = type(err).__name__
    text = str(err).strip() or name
    if name == "UnidentifiedImageError":
        return f"{text}: not a readable image; replace or remove the file"
    if name == "SafetensorError":
        return f"corrupt or truncated .safetensors file ({text}); restore or re-create it"
    if isinstance(err, (zipfile.BadZipFile, EOFError)):
        return f"corrupt or truncated file ({text}); restore or re-create it"
    if name == "UnpicklingError":
        return f"corrupt or refused pickle ({text})"
    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON ({text}); restore or re-create the file"
    if name == "ScannerError" or name == "ParserError" or name.endswith("YAMLError"):
        return "invalid YAML: " + " ".join(text.split())
    if isinstance(err, OSError) and text.startswith("Unable to load weights"):  # diffusers, a damaged weights file
        return f"{text} The file is truncated or corrupt: restore it, or use another checkpoint."
    if isinstance(err, (ValueError, UserError, OSError)):
        return " ".join(text.splitlines()) if len(text) < 2000 else text
    return f"{name}: {text}"


def debug_requested(argv: Sequence[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def run_main(fn: Callable, argv: Optional[Sequence[str]] = None, *, prog: Optional[str] = None):
    """fn(argv without --debug); an expected error -> `PROG: error: ...` on stderr and SystemExit(2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        return fn(argv)
    except expected_errors() as err:
        if debug:
            raise
        # one write: the lines of several processes (torchrun ranks) never interleave within a line
        sys.stderr.write(f"{prog or os.path.basename(sys.argv[0])}: error: {describe(err)}\n")
        sys.stderr.flush()
        raise SystemExit(EXIT_USAGE) from None


def command(prog: str):
    """Decorator of a command's main(argv): main(None) reads sys.argv; errors end as `run_main` says."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def main(argv: Optional[Sequence[str]] = None):
            return run_main(fn, argv, prog=prog)

        return main

    return wrap


def add_renamed_option(parser, old: str, new: str, prog: str) -> None:
    """Accept the spelling `old` of option `new` for one more release, with one deprecation line on stderr."""
    import argparse

    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"{prog}: {old} is deprecated and will be removed in the next release: use {new}", file=sys.stderr)
            setattr(namespace, self.dest, values)

    parser.add_argument(old, dest=new.lstrip("-").replace("-", "_"), action=Renamed, help=argparse.SUPPRESS)


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """--no-progress: diffusers' own bars (loading pipeline components) off too, while the command runs."""
    from diffusers.utils import logging as diffusers_logging

    was = diffusers_logging.is_progress_bar_enabled()
    if not enabled:
        diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            diffusers_logging.enable_progress_bar()


def add_debug_option(parser) -> None:
    """List --debug in a parser's help (run_main removes it from argv before parsing)."""
    parser.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
