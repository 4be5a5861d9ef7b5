"""The ``lora-jax`` command line: every subcommand's options, defaults and help, and :class:`CliError`.

Nothing here imports JAX (nor Flax, optax or orbax), so ``lora-jax --help``,
``lora-jax COMMAND --help`` and a wrong command line answer at once; the
commands themselves are in :mod:`lora_jax.app.cli_commands`, imported by
:func:`lora_jax.app.cli.main` only when one runs. The exit codes are
described in :mod:`lora_jax.app.cli`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
from collections.abc import Callable

from lora_jax import __version__
from lora_jax.app.demo import options as demo_options

PROG = "lora-jax"
#: ``--backend`` choices: :data:`lora_jax.backend.BACKENDS` (which imports JAX; a test checks they agree).
BACKENDS = ("auto", "cpu", "gpu", "tpu")
#: ``merge --dtype`` choices: the names of :data:`lora_jax.models.hf.DTYPES` (a test checks they agree).
DTYPE_NAMES = ("bfloat16", "float16", "float32")
#: The ``model_type`` values of the folders ``--model`` takes: :data:`lora_jax.models.hf.ARCHITECTURES`
#: (a test checks they agree).
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2")
_MODEL_DIR = f"Hugging Face model folder (config.json model_type {', '.join(MODEL_TYPES)})"
#: ``train --sharding`` choices: :data:`lora_jax.sharding.STRATEGIES` (a test checks they agree).
STRATEGIES = ("dp", "fsdp", "tp", "fsdp_tp")
#: ``train --eval-data`` scores at most this many windows.
MAX_EVAL_WINDOWS = 16

__all__ = ["BACKENDS", "COMMANDS", "CliError", "Command", "DTYPE_NAMES", "MAX_EVAL_WINDOWS", "MODEL_TYPES", "PROG",
           "STRATEGIES", "build_parser"]


class CliError(Exception):
    """A problem the user can fix; the command prints its message and exits with ``code``.

    ``code`` is 2 for a wrong command line (a path that does not exist or is
    not the kind of folder the option names, an invalid option value) and 1
    for a problem found while running (a damaged file, data that do not fit);
    the rule in full is in :mod:`lora_jax.app.cli`'s docstring.
    """

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# ---- option values

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _dropout(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _mesh(text: str) -> tuple[int, int]:
    """``DATAxMODEL`` device counts.

    >>> _mesh("4x2")
    (4, 2)
    """
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"must be DATAxMODEL device counts such as 8x1 or 4x2, got {text!r}")
    return int(parts[0]), int(parts[1])


def _targets(text: str) -> list[str]:
    entries = [t.strip() for t in text.split(",") if t.strip()]
    if not entries:
        raise argparse.ArgumentTypeError("must name at least one target")
    return entries


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help=f"{_MODEL_DIR}: the frozen base")
    p.add_argument("--data", required=True, metavar="FILE",
                   help='training text: a plain text file, or .jsonl with a "text" field per line')
    p.add_argument("--out", required=True, metavar="ADAPTER_DIR",
                   help="where the PEFT adapter and the checkpoints/ folder go")
    p.add_argument("--rank", type=_positive_int, default=8, metavar="R", help="LoRA rank r (default 8)")
    p.add_argument("--alpha", type=_positive_float, default=16.0, metavar="ALPHA",
                   help="LoRA alpha; scale = alpha / r (default 16)")
    p.add_argument("--targets", type=_targets, default=["attention", "mlp"], metavar="LIST",
                   help="comma-separated layers to adapt: presets attention, mlp, embedding, all-linear; globs "
                        "such as q_proj or 'layers_?/mlp/*'; or re:<regex> (default attention,mlp)")
    p.add_argument("--dropout", type=_dropout, default=0.0, metavar="P",
                   help="dropout on the adapters' input (default 0)")
    p.add_argument("--steps", type=_positive_int, default=200, metavar="N", help="total training steps (default 200)")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=_nonnegative_float, default=0.01, metavar="WD",
                   help="AdamW weight decay (default 0.01)")
    p.add_argument("--max-grad-norm", type=_nonnegative_float, default=1.0, metavar="NORM",
                   help="clip the adapters' gradient norm; 0 disables (default 1.0)")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="B", help="windows per step (default 8)")
    p.add_argument("--seq-len", type=_positive_int, default=128, metavar="L", help="tokens per window (default 128)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of the adapters' init and the data order (default 0)")
    p.add_argument("--save-every", type=_positive_int, default=50, metavar="N",
                   help="write a checkpoint every N steps, and at the end (default 50)")
    p.add_argument("--eval-data", metavar="FILE",
                   help=f"held-out text (plain or .jsonl): its first {MAX_EVAL_WINDOWS} windows of --seq-len tokens "
                        f"give a held-out loss every --eval-every steps and at the end")
    p.add_argument("--eval-every", type=_positive_int, default=50, metavar="N",
                   help="steps between held-out losses with --eval-data (default 50)")
    p.add_argument("--mesh", type=_mesh, default=None, metavar="DxM",
                   help="train on a DATA x MODEL mesh of the backend's devices (with several processes, all of "
                        "theirs); the batch splits over DATA (default: one device)")
    p.add_argument("--sharding", choices=STRATEGIES, default="fsdp",
                   help="with --mesh, how the frozen base is laid out: dp (replicated), fsdp (each weight split over "
                        "DATA), tp (Megatron split over MODEL), fsdp_tp (both) (default fsdp)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in ADAPTER_DIR/checkpoints to --steps")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the adapter files already in ADAPTER_DIR (never its checkpoints; never the "
                        "--model folder)")


def _add_merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help=f"{_MODEL_DIR}: the base")
    p.add_argument("--adapter", required=True, metavar="ADAPTER_DIR", help="PEFT LoRA adapter folder")
    p.add_argument("--out", required=True, metavar="DIR", help="new folder for the merged model")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="dtype of the merged weights (default: the base's); float32 avoids the rounding of "
                        "W + delta to bfloat16 or float16")


def _add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help=_MODEL_DIR)
    p.add_argument("--adapter", metavar="ADAPTER_DIR", help="PEFT LoRA adapter to apply (unmerged)")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, metavar="N", help="tokens to add (default 64)")
    p.add_argument("--temperature", type=_nonnegative_float, default=0.0, metavar="T",
                   help="0 for greedy decoding, else sampling temperature (default 0)")
    p.add_argument("--top-k", type=_positive_int, default=None, metavar="K",
                   help="with sampling, keep only the K most likely tokens")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the sampling (default 0)")


def _add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="PEFT LoRA adapter folder")


def _add_study_budget(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--steps", type=_positive_int, default=50, metavar="N",
                   help="training steps of every adapter (default 50)")
    p.add_argument("--lr", type=_positive_float, default=5e-3,
                   help="AdamW rate at scale 1; an adapter of scale alpha/r trains at lr / scale (default 5e-3)")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="B", help="windows per step (default 8)")
    p.add_argument("--seq-len", type=_positive_int, default=128, metavar="L", help="bytes per window (default 128)")
    p.add_argument("--eval-rows", type=_positive_int, default=32, metavar="N",
                   help="held-out windows per corpus for the losses (default 32)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of adapters and batches (default 0)")
    p.add_argument("--out", default=out, metavar="DIR", help=f"folder for the table, plot and JSON (default {out})")


def _add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranks", type=_positive_int, nargs="+", default=list(demo_options.DEFAULT_RANKS), metavar="R",
                   help=f"the ranks to train (default {' '.join(map(str, demo_options.DEFAULT_RANKS))})")
    p.add_argument("--alpha-per-rank", type=_positive_float, default=2.0, metavar="K",
                   help="alpha = K * rank, so every rank has scale K (default 2)")
    _add_study_budget(p, "lora_jax_sweep")


def _add_interference_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpora", nargs="+", choices=demo_options.CORPORA, default=list(demo_options.CORPORA),
                   metavar="NAME",
                   help=f"one adapter per corpus, at least two of {', '.join(demo_options.CORPORA)} (default all; "
                        f"shout is the prose in capitals)")
    p.add_argument("--rank", type=_positive_int, default=8, metavar="R", help="LoRA rank of every adapter (default 8)")
    p.add_argument("--alpha", type=_positive_float, default=16.0, metavar="ALPHA",
                   help="LoRA alpha of every adapter (default 16)")
    _add_study_budget(p, "lora_jax_interference")


# ---- the commands and the parser

@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: its help line, description, examples, arguments and implementation.

    ``run`` names the implementation, a function of :mod:`lora_jax.app.cli_commands` (imported
    only when the command runs: it loads JAX).
    """

    help: str
    description: str
    examples: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: str


COMMANDS = {
    "train": Command(
        "train a LoRA adapter on a text file",
        "Train a LoRA adapter of a Hugging Face model (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, GPT-2)\n"
        "on plain text or JSONL, with AdamW. Each step takes random windows of --seq-len tokens (fixed by\n"
        "--seed and the step number, so --resume is exact).\n"
        "Writes ADAPTER_DIR/adapter_config.json + adapter_model.safetensors (PEFT format) and orbax\n"
        "checkpoints in ADAPTER_DIR/checkpoints/. The tokenizer is DIR/tokenizer.json, or UTF-8 bytes\n"
        'when config.json says "lora_jax_tokenizer": "bytes". With --mesh it trains sharded over several\n'
        "devices; several processes (hosts) run the same command with LORA_JAX_COORDINATOR_ADDRESS,\n"
        "LORA_JAX_NUM_PROCESSES and LORA_JAX_PROCESS_ID set, and an ADAPTER_DIR they all see.",
        "  lora-jax train --model llama-dir --data notes.txt --out my-adapter\n"
        "  lora-jax train --model llama-dir --data chat.jsonl --out my-adapter --rank 16 --alpha 32 \\\n"
        "      --targets q_proj,v_proj --steps 1000 --lr 2e-4 --batch-size 4 --seq-len 512\n"
        "  lora-jax train --model llama-dir --data chat.jsonl --out my-adapter --steps 2000 --resume\n"
        "  lora-jax train --model llama-dir --data notes.txt --out my-adapter --mesh 8x1 --sharding fsdp",
        _add_train_arguments, "run_train"),
    "merge": Command(
        "fold an adapter into the base weights",
        "Write a Hugging Face folder whose weights are W + scale * A @ B (no adapter needed to run it),\n"
        "with the base's tokenizer files; then check merged against unmerged logits on a probe input and say\n"
        "whether the difference is within the rounding of the weights' dtype (--dtype float32 avoids it).",
        "  lora-jax merge --model llama-dir --adapter my-adapter --out llama-merged",
        _add_merge_arguments, "run_merge"),
    "generate": Command(
        "continue a prompt, with or without an adapter",
        "Continue --prompt with the model (and --adapter, applied unmerged); prints the new text only.",
        "  lora-jax generate --model llama-dir --prompt 'Once upon a time'\n"
        "  lora-jax generate --model llama-dir --adapter my-adapter --prompt 'Q: why?' --max-new-tokens 32\n"
        "  lora-jax generate --model llama-dir --prompt 'Hi' --temperature 0.8 --top-k 40 --seed 3",
        _add_generate_arguments, "run_generate"),
    "inspect": Command(
        "describe an adapter: layers, ranks, scales, spectra",
        "Print a PEFT adapter's targets, parameter count and file size, and per layer its rank, alpha,\n"
        "scale and the singular values of its update scale * A @ B (from the small factors; the dense\n"
        "update is never formed): the largest, the effective rank exp(entropy of sigma / sum sigma) and\n"
        "the top-1 share of the energy sum sigma^2. The base model is not needed.",
        "  lora-jax inspect my-adapter",
        _add_inspect_arguments, "run_inspect"),
    "demo": Command(
        "run the built-in end-to-end demo",
        demo_options.DEMO_DESCRIPTION,
        "  lora-jax demo\n  lora-jax demo --steps 50 --out /tmp/demo\n"
        "  lora-jax demo --study          # + learning rates, ranks, targets, 3 seeds (about 15 min on 2 cores)",
        demo_options.add_arguments, "run_demo"),
    "sweep": Command(
        "train the demo task at several ranks and compare",
        "On the demo's base model (a byte-level Llama that knows English prose), train LoRA on Python source\n"
        "at each --ranks with the same steps, batches, rate and seed (alpha = K * rank: the same scale at every\n"
        "rank). Prints and writes (sweep.md, sweep.png, sweep.json in --out) per rank: held-out loss on code\n"
        "(learning) and prose (forgetting), trainable parameters, the mean effective rank of the trained\n"
        "deltas and the median over layers of the rank holding 90% of their energy.",
        "  lora-jax sweep\n"
        "  lora-jax sweep --ranks 1 4 16 --steps 100 --out /tmp/sweep",
        _add_sweep_arguments, "run_sweep"),
    "interference": Command(
        "train one adapter per corpus and measure how they interfere",
        "On the demo's base model, train one adapter per --corpora (same config and budget). Prints and writes\n"
        "(interference.md, interference.png, interference.json in --out) the mean subspace overlap of every\n"
        "pair (input side, over layers) and each adapter's held-out loss on its own corpus alone and with\n"
        "each other adapter added (their deltas summed).",
        "  lora-jax interference\n"
        "  lora-jax interference --corpora prose code --rank 4 --alpha 8 --steps 100 --out /tmp/interference",
        _add_interference_arguments, "run_interference"),
}


def _add_common(p: argparse.ArgumentParser) -> None:
    """``--backend`` and ``--debug``; skipped where a command (the demo) defines them itself."""
    for flags, kwargs in ((("--backend",), dict(choices=BACKENDS, default="auto",
                                                help="device to compute on (default auto: an accelerator if "
                                                     "there is one)")),
                          (("--debug",), dict(action="store_true", help="show tracebacks instead of one-line "
                                                                         "errors"))):
        with contextlib.suppress(argparse.ArgumentError):
            p.add_argument(*flags, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The ``lora-jax`` parser: one subcommand per entry of ``COMMANDS``."""
    parser = argparse.ArgumentParser(prog=PROG, description="LoRA adapters for Hugging Face language models (Llama, "
                                                            "Mistral, Qwen2/3, Gemma 2/3, Phi-3, GPT-2), in JAX.",
                                     epilog="Run 'lora-jax COMMAND --help' for a command's options and examples.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = subparsers.add_parser(name, help=cmd.help, description=cmd.description,
                                  epilog="examples:\n" + cmd.examples,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_arguments(p)
        _add_common(p)
    return parser
