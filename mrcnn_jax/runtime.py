"""Process-level settings for running on the CPU backend: XLA flags and host memory; and how the
command lines report an input of the user's that does not fit (`reporting_user_errors`).

Imports no JAX, so `set_default_xla_flags` can run before JAX creates its backends (XLA reads
`XLA_FLAGS` once, when the first backend is created; a flag set later has no effect, and XLA:CPU
takes this one from the environment only: per-compile `compiler_options` do not reach it).
"""

from __future__ import annotations

import ctypes
import difflib
import functools
import logging
import os
import re
import sys
from collections.abc import Callable, MutableMapping

# XLA:CPU's default concurrency-optimised scheduler orders instructions so that more of them can
# run at once, at the price of keeping more buffers alive: the R50-FPN train step at 800 x 1216,
# batch 2, needs 3.84 GiB of temporaries with it and 2.58 GiB with the memory-minimising one, for
# the same step time on 2 cores (docs/performance.md). The flag only concerns XLA:CPU: GPU and
# TPU compilations ignore it.
CPU_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def set_default_xla_flags(environ: MutableMapping[str, str] | None = None) -> str:
    """Adds each of `CPU_XLA_FLAGS` to XLA_FLAGS unless the flag is already set there (so a
    user's own setting wins); returns the new value. Call it before anything runs on JAX."""
    environ = os.environ if environ is None else environ
    flags = environ.get("XLA_FLAGS", "").split()
    names = {f.split("=", 1)[0] for f in flags}
    flags += [f for f in CPU_XLA_FLAGS if f.split("=", 1)[0] not in names]
    environ["XLA_FLAGS"] = " ".join(flags)
    return environ["XLA_FLAGS"]


def release_host_memory() -> bool:
    """Hands the C heap's free pages back to the OS (glibc `malloc_trim`); True if it could.

    Compiling a program and initialising the weights leave a few hundred MB to a GB of freed
    but still resident heap behind (XLA and LLVM work buffers), which the training step's own
    buffers do not reuse: on the CPU backend that memory adds to the training peak (R50-FPN,
    800 x 1216: 0.6 GiB, docs/performance.md). A no-op (False) off glibc.
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is None:
        return False
    return bool(trim(0))


class _OrbaxInfo(logging.Filter):
    """Drops the INFO / DEBUG records orbax-checkpoint logs through absl: about 60 lines per
    checkpoint saved (temporary directories, handlers, threads, OCDBT merges), which made 80 of
    the 109 lines of a two-step training log. Its warnings and errors pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace(os.sep, "/")
        return record.levelno >= logging.WARNING or "/orbax/" not in path


def quiet_library_logs(verbosity: int = 0) -> None:
    """At absl's default verbosity (0; `--verbosity=1` or `-v 1` keeps everything), leaves
    orbax-checkpoint's INFO records out of the log (`_OrbaxInfo`). Idempotent."""
    absl_logger = logging.getLogger("absl")
    installed = any(isinstance(f, _OrbaxInfo) for f in absl_logger.filters)
    if verbosity < 1 and not installed:
        absl_logger.addFilter(_OrbaxInfo())


def progress_bars_for(stream) -> bool:
    """TFDS's progress bars (dataset preparation) on when `stream` (the command line's stderr) is
    a terminal, off when it goes to a file or a cluster's log, where each update would be
    another long line between the log records. -> whether they are on."""
    import tensorflow_datasets as tfds

    on = bool(getattr(stream, "isatty", lambda: False)())
    (tfds.enable_progress_bar if on else tfds.disable_progress_bar)()
    return on


# Exit status of a command line refused by `reporting_user_errors` (absl's for a usage error, too).
USER_ERROR_EXIT_STATUS = 2


class ConfigError(ValueError):
    """The config has keys the base config does not know, or values of the wrong type
    (`main.validate_config`)."""


class InputError(Exception):
    """Something the user named cannot be used: a path that is not there, a split the dataset
    lacks, an annotation file that does not parse. The message names it; the command lines
    report it as one line (`reporting_user_errors`)."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder the user named is not there (also a FileNotFoundError)."""


class InvalidInputError(InputError, ValueError):
    """A file, folder or name the user gave is there but cannot be used (also a ValueError)."""


def named_input_error(error: FileNotFoundError | ValueError, where: str) -> InputError:
    """`error` as the InputError of what the user named (`where`: a flag or config key and its
    value), prefixed with it: MissingInputError for a FileNotFoundError, else InvalidInputError.
    Raise it `from error`."""
    kind = MissingInputError if isinstance(error, OSError) else InvalidInputError
    return kind(f"{where}: {error}")


def config_flag_value(holder):
    """`holder.value` of an ml_collections config flag, or MissingInputError naming its file when
    that is not there (ml_collections hands out a stand-in whose first use raises a chain of
    OSErrors). Other load errors (a config file that fails) propagate as they are."""
    from absl import flags

    path = flags.FLAGS[holder.name].config_filename or ""
    if path and not os.path.isfile(path.split(":", 1)[0]):  # FILE[:ARGS], ml_collections' form
        raise MissingInputError(f"--{holder.name}={path}: no such file")
    return holder.value


def reporting_user_errors(
    main: Callable[[list[str]], None], errors: tuple[type[BaseException], ...] = ()
) -> Callable[[list[str]], None]:
    """`main` for absl's app.run, with the library's errors about the user's input (a config,
    checkpoints or weights that do not fit, a path or split that is not there: ConfigError,
    InputError, checkpoint.RestoreError and WeightsMismatchError, and `errors`) logged as one
    message and exit status 2 instead of a traceback: their messages say what is wrong and how
    to fix it. Every other exception propagates as it is. (A module run as a script passes its
    own error classes in `errors`: they are its `__main__` copies, not the importable module's.)"""

    @functools.wraps(main)
    def run(argv):
        try:
            return main(argv)
        except Exception as e:
            from mrcnn_jax import checkpoint

            known = (ConfigError, InputError, checkpoint.RestoreError,
                     checkpoint.WeightsMismatchError, *errors)
            if not isinstance(e, known):
                raise
            logging.getLogger("absl").error("%s: %s", type(e).__name__, e)
            sys.exit(USER_ERROR_EXIT_STATUS)

    return run


# What ml_collections raises while applying an override `--config.a.b=...` whose path does not
# exist (a missing key, a field below a value, an item of a tuple, an unparsable path).
OVERRIDE_ERRORS = (AttributeError, KeyError, TypeError, IndexError, ValueError)


def unknown_override_message(argv: list[str], error: Exception) -> str | None:
    """For the error ml_collections raises while applying an override `--config.a.b=...` whose
    path does not exist: a message naming the flag and what it reaches into: the fields of the
    group that lacks the key (closest first), or the value a path goes below (`base_lr.x` on a
    float). None when every override of `argv` names an existing key (the error is not ours)."""
    import ml_collections

    from configs import base

    del error  # each override's path is checked against the reference config instead
    reference = base.get_config()
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        dotted = arg[len("--config."):].split("=", 1)[0]
        # `a.b[1]` names item 1 of a.b (ml_collections' syntax); `a.b.1` is read as field "1"
        steps = re.findall(r"\[(\d+)\]|([^.\[\]]+)", dotted)
        holder, path = reference, "config"
        for index, key in steps:
            if isinstance(holder, ml_collections.ConfigDict) and key:
                if key in holder:
                    holder, path = holder[key], f"{path}.{key}"
                    continue
                close = difflib.get_close_matches(key, list(holder), n=3, cutoff=0.5)
                hint = (f"did you mean {' or '.join(close)}?" if close
                        else f"its fields: {', '.join(holder)}")
                return f"--config.{dotted}: {path} has no field {key!r} ({hint})"
            if isinstance(holder, tuple) and index:  # ml_collections sets no item of a tuple
                return (f"--config.{dotted}: {path} is a tuple, set as a whole:"
                        f" --config.{path[len('config.'):]}=A,B,...")
            # the type, not the value: the config being loaded may set another one
            kind = "None" if holder is None else f"a {type(holder).__name__}"
            name = f"field {key!r}" if key else f"item [{index}]"
            if isinstance(holder, ml_collections.ConfigDict):  # a group has fields, not items
                how = (f"set its fields: --config.{path[len('config.'):]}.FIELD=VALUE; its"
                       f" fields: {', '.join(holder)}")
            else:
                how = f"set it with --config.{path[len('config.'):]}=VALUE"
            return f"--config.{dotted}: {path} is {kind}: it has no {name} ({how})"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with an override of a config key that does not exist reported as
    one line, like absl's other flag errors (status 1), instead of ml_collections' chained
    tracebacks ending in `AttributeError: "'name'"` or `KeyError: "Attribute <class ...>"`."""
    from absl import app

    try:
        return app.parse_flags_with_usage(argv)
    except OSError:  # an override applied to the stand-in of a --config file that failed to load
        for arg in argv[1:]:
            path = arg[len("--config="):].split(":", 1)[0] if arg.startswith("--config=") else ""
            if path and not os.path.isfile(path):
                sys.stderr.write(f"FATAL Flags parsing error: --config={path}: no such file\n")
                sys.exit(1)
        raise
    except OVERRIDE_ERRORS as e:
        exit_for_unknown_override(argv, e)


def exit_for_unknown_override(argv: list[str], error: Exception) -> None:
    """Exits with status 1 and `unknown_override_message`'s line; re-raises any other error."""
    message = unknown_override_message(argv, error)
    if message is None:
        raise error
    sys.stderr.write(f"FATAL Flags parsing error: {message}\n")
    sys.exit(1)
