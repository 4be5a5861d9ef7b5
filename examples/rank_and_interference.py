"""What LoRA's rank buys, and how adapters trained on different data interfere, measured on the demo base.

  1. rank sweep: the demo's base (a small byte-level Llama that knows English prose) learns Python source
     at ranks 1, 2, 4, ..., 64 with the same steps, batches, learning rate and seed; alpha = 2 * rank, so
     every rank has scale 2 and only the rank differs. Per rank: held-out loss on code (learning) and on
     prose (forgetting), trainable parameters, and from the trained deltas' singular values the mean
     effective rank and the median over layers of the rank that holds 90% of the energy;
  2. interference: one rank-8 adapter (alpha 16) each on prose, code and "shout" (the prose in capitals),
     then the mean subspace overlap of every pair (input side, over layers) and each adapter's held-out
     loss on its own corpus alone and with another adapter added;
  3. truncation: a rank-32 code adapter cut to the ranks that keep 99%, 90%, 75% and 50% of each
     layer's energy, with the held-out loss and logit difference each cut costs.

The same runs are ``lora-jax sweep`` and ``lora-jax interference``; this script also writes the tables,
plots and JSON to --out. Every corpus is built from the Python installation; nothing is downloaded.

Run from the repository root:  python examples/rank_and_interference.py [--steps 50] [--out DIR]
(a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import time

from lora_jax.app.demo import study


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="training steps of every adapter (default 50)")
    parser.add_argument("--ranks", type=int, nargs="+", default=list(study.DEFAULT_RANKS),
                        help="ranks of the sweep (default 1 2 4 8 16 32 64)")
    parser.add_argument("--rank", type=int, default=8, help="rank of the interference adapters (default 8)")
    parser.add_argument("--alpha", type=float, default=16.0, help="alpha of the interference adapters (default 16)")
    parser.add_argument("--truncate-rank", type=int, default=32,
                        help="rank of the adapter the truncation study cuts (default 32)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per training step (default 8)")
    parser.add_argument("--seq-len", type=int, default=128, help="bytes per window (default 128)")
    parser.add_argument("--eval-rows", type=int, default=32, help="held-out windows per corpus (default 32)")
    parser.add_argument("--max-bytes", type=int, default=300_000, help="train bytes per corpus (default 300000)")
    parser.add_argument("--heldout-bytes", type=int, default=100_000,
                        help="held-out bytes per corpus (default 100000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of adapters and batches (default 0)")
    parser.add_argument("--out", default="rank_and_interference", help="folder for tables, plots and JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    budget = dict(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, eval_rows=args.eval_rows,
                  max_bytes=args.max_bytes, heldout_bytes=args.heldout_bytes, seed=args.seed,
                  show_progress=not args.no_progress)

    print(f"rank sweep: code on the demo base, ranks {args.ranks}, {args.steps} steps each, alpha = 2 * rank\n")
    sweep = study.rank_sweep(args.ranks, **budget)
    print(sweep.markdown())
    print(f"\n[{time.perf_counter() - start:.0f} s]\n")

    print(f"interference: one rank-{args.rank} adapter (alpha {args.alpha:g}) per corpus {list(study.CORPORA)}, "
          f"{args.steps} steps each\n")
    inter = study.interference_study(rank=args.rank, alpha=args.alpha, **budget)
    print(inter.markdown())

    print(f"\ntruncation: a rank-{args.truncate_rank} code adapter (alpha {2 * args.truncate_rank}), "
          f"{args.steps} steps, cut by energy per layer\n")
    cut = study.truncation_study(rank=args.truncate_rank, **budget)
    print(cut.markdown())

    files = sweep.save(args.out) + inter.save(args.out)
    print(f"\nwrote {', '.join(f.name for f in files)} to {args.out}")
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
