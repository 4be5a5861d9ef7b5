"""The ``lora-jax`` command: train, merge, generate with and inspect LoRA adapters of Llama models.

Models are Hugging Face Llama folders (``config.json`` + safetensors) and
adapters are PEFT folders (``adapter_config.json`` +
``adapter_model.safetensors``), so what ``train`` writes loads in PyTorch with
``PeftModel.from_pretrained`` and what ``merge`` writes with
``AutoModelForCausalLM.from_pretrained``.

A problem the user can fix prints ``lora-jax <command>: error: <message>``
(the whole message: a list it ends with, such as the available layers, is
printed on indented lines after the first) and exits with

- 2 when the command line is wrong, and changing it is the fix: an invalid
  option value (also one found invalid only against the model, such as
  ``--targets`` matching no layer or ``--top-k`` above the vocabulary), a
  path that does not exist or is not the kind the option names (a file for
  a folder, a folder that is not a model or PEFT adapter folder), an
  ``--out`` that would overwrite something, or ``--resume`` that does not
  fit the checkpoints (none, or other settings);
- 1 when something is found while running: a damaged or malformed file
  (JSON, JSONL, safetensors, checkpoint), data or an adapter that does not
  fit the model, training whose values become non-finite.

``--debug`` shows the traceback instead.

The parser (every command's options, defaults and help) is built by
:mod:`lora_jax.app.cli_args` and the commands are in
:mod:`lora_jax.app.cli_commands`; ``main`` imports the latter, and with it
JAX, only to run a command, so ``--help``, ``--version`` and a wrong command
line answer without loading JAX.
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from collections.abc import Sequence

from lora_jax.app.cli_args import COMMANDS, PROG, CliError, build_parser

__all__ = ["CliError", "build_parser", "main"]


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run(args) -> int:
    """Runs the parsed command; its implementation, and JAX, are imported now."""
    from lora_jax.app import cli_commands   # deferred: JAX, not needed to parse the command line

    return int(getattr(cli_commands, COMMANDS[args.command].run)(args) or 0)


def _error_message(err: BaseException) -> tuple[int, str]:
    """``(exit code, message)`` for an exception raised by a command; lines after the first are indented.

    The library's errors a user can fix are ``ValueError`` (``UnsupportedAdapterError`` among them) or
    ``OSError``; the commands turn the others (a backend without a device) into a :class:`CliError`.

    >>> _error_message(CliError("--rank: too big\\navailable: 1, 2", code=2))
    (2, '--rank: too big\\n  available: 1, 2')
    """
    if isinstance(err, CliError):
        code, message = err.code, str(err)
    elif isinstance(err, json.JSONDecodeError):
        code, message = 1, f"invalid JSON: {err}"
    elif isinstance(err, (ValueError, OSError)):
        code, message = 1, str(err) or type(err).__name__
    else:
        code, message = 1, f"unexpected {type(err).__name__}: {err} (rerun with --debug for the traceback)"
    first, *rest = message.splitlines() or [""]
    return code, "\n".join([first] + ["  " + line.strip() for line in rest if line.strip()])


@contextlib.contextmanager
def _warnings_as_notes(prog: str):
    def show(message, category, filename, lineno, file=None, line=None):
        _note(f"{prog}: warning: {message}")

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``lora-jax`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a usage error argparse has already printed
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    prog = f"{PROG} {args.command}"
    try:
        with _warnings_as_notes(prog):
            return _run(args)
    except KeyboardInterrupt as err:
        if args.debug:
            raise
        _note(f"{prog}: {err or 'interrupted'}")
        return 130
    except Exception as err:  # noqa: BLE001 -- every error becomes one line unless --debug
        if getattr(args, "debug", False):
            raise
        code, message = _error_message(err)
        _note(f"{prog}: error: {message}")
        return code
