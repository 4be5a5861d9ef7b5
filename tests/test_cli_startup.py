"""``lora-jax --help``, every ``lora-jax COMMAND --help`` and a wrong command line answer without importing
JAX, Flax, optax or orbax (about 0.1 s instead of 1.5 s), and ``import lora_jax`` loads none of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from lora_jax.app import cli_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("jax", "flax", "optax", "orbax")
# Runs main(argv) for each argv of sys.argv[1] (JSON), then prints the exit codes and the heavy modules loaded.
PROBE = """\
import json, sys
from lora_jax.app.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    try:
        codes.append(main(argv))
    except SystemExit as exit_:   # main returns its status; this only guards against a regression
        codes.append(exit_.code)
print(json.dumps([codes, sorted(m for m in {heavy!r} if m in sys.modules)]))
"""


def _probe(*argvs: list[str]) -> tuple[list[int], list[str], str, str]:
    """``(exit codes, heavy modules loaded, stdout before the verdict, stderr)`` of ``main`` on each argv,
    in one fresh interpreter."""
    result = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), json.dumps(list(argvs))],
                            capture_output=True, text=True, timeout=60, cwd=ROOT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    *out, verdict = result.stdout.splitlines()
    codes, loaded = json.loads(verdict)
    return codes, loaded, "\n".join(out), result.stderr


def test_top_level_help_loads_no_jax():
    codes, loaded, out, _ = _probe(["--help"], ["--version"])
    assert codes == [0, 0] and loaded == []
    assert out.startswith("usage: lora-jax") and "Run 'lora-jax COMMAND --help'" in out
    for command in cli_args.COMMANDS:
        assert f"    {command}" in out, command


def test_every_command_help_loads_no_jax():
    commands = list(cli_args.COMMANDS)
    codes, loaded, out, _ = _probe(*[[command, "--help"] for command in commands])
    assert codes == [0] * len(commands) and loaded == []
    for command in commands:
        assert f"usage: lora-jax {command}" in out and f"examples:\n  lora-jax {command}" in out, command
    assert "--pretrain-steps PRETRAIN_STEPS" in out and "--backend {auto,cpu,gpu,tpu}" in out


def test_a_wrong_command_line_exits_2_without_jax():
    codes, loaded, _, err = _probe(["train", "--bogus"],
                                   ["train", "--model", "m", "--data", "d", "--out", "o", "--bogus"],
                                   ["merge", "--model", "m", "--adapter", "a", "--out", "o", "--dtype", "float8"],
                                   [])
    assert codes == [2, 2, 2, 2] and loaded == []
    assert "usage: lora-jax train" in err and "lora-jax train: error: the following arguments are required" in err
    assert "lora-jax: error: unrecognized arguments: --bogus" in err
    assert "lora-jax merge: error: argument --dtype: invalid choice: 'float8'" in err
    assert err.rstrip().endswith("Run 'lora-jax COMMAND --help' for a command's options and examples.")   # no COMMAND


def test_an_error_found_before_the_command_needs_jax_keeps_its_code():
    # A CliError of the command (code 2) still goes through the command module, which loads JAX.
    codes, loaded, _, err = _probe(["sweep", "--ranks", "2", "2"])
    assert codes == [2] and "lora-jax sweep: error: --ranks repeats a rank: 2 2" in err
    assert "jax" in loaded


def test_import_lora_jax_loads_no_jax():
    code = ("import sys, lora_jax\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), "
            "sorted(m for m in sys.modules if m.startswith('lora_jax')))\n"
            "from lora_jax import LoraConfig, init_lora, lora_apply, merge\n"
            "import lora_jax.config, lora_jax.linen, lora_jax.tree\n"
            "print(LoraConfig is lora_jax.config.LoraConfig and init_lora is lora_jax.linen.init_lora "
            "and lora_apply is lora_jax.lora_apply and merge is lora_jax.tree.merge)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[] ['lora_jax', 'lora_jax.deprecation']", "True"]


def test_the_parsers_choices_are_the_librarys():
    # cli_args keeps copies (the library's modules import JAX); they must not drift.
    from lora_jax import backend, sharding
    from lora_jax.models.hf import ARCHITECTURES, DTYPES

    assert cli_args.BACKENDS == backend.BACKENDS
    assert cli_args.DTYPE_NAMES == tuple(sorted(DTYPES))
    assert cli_args.STRATEGIES == sharding.STRATEGIES
    assert cli_args.MODEL_TYPES == tuple(ARCHITECTURES)
