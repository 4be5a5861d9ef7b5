"""Runs the benchmarks: ``python -m bench [--quick | --full] [--only NAME]``.

Each benchmark writes ``bench/results/<name>.json``; ``bench/results/README.md``
is rebuilt from all the JSON files there.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

# name -> module under bench/; each has NAME, TITLE and run(mode) -> dict.
BENCHMARKS = {"train_step": "bench.train_step", "nnx_step": "bench.nnx_step", "peers": "bench.peers",
              "multi_adapter": "bench.multi_adapter", "dora": "bench.dora", "qlora": "bench.qlora",
              "architecture": "bench.architecture", "generation": "bench.generation"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench",
                                     description="Run the lora_jax benchmarks; results go to bench/results/.")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="few repeats (the default)")
    size.add_argument("--full", dest="mode", action="store_const", const="full", help="more repeats")
    size.add_argument("--smoke", dest="mode", action="store_const", const="smoke",
                      help="one timed round: checks that everything runs, measures nothing worth keeping")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), help="run one benchmark")
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (default: bench/results; a fresh temporary one for --smoke)")
    parser.set_defaults(mode="quick")
    args = parser.parse_args(argv)

    from bench import common  # imports jax; after argparse so --help stays fast

    hdr = common.header()
    common.log(f"bench ({args.mode}): {hdr['cpu']}, {hdr['cpu_cores']} cores; jax {hdr['jax']} on "
               f"{hdr['backend']} ({hdr['device_kind']})")
    out = args.out or (Path(tempfile.mkdtemp(prefix="lora_jax_bench_smoke_")) if args.mode == "smoke"
                       else common.RESULTS)
    names = [args.only] if args.only else list(BENCHMARKS)
    for name in names:
        module = importlib.import_module(BENCHMARKS[name])
        start = time.perf_counter()
        common.log(f"== {name}: {module.TITLE}")
        result = module.run(args.mode)
        path = common.save(name, {**result, "wall_s": time.perf_counter() - start}, hdr, out)
        common.log(f"== {name} done in {time.perf_counter() - start:.1f}s -> {path}")
        for table in result.get("tables", []):
            print(f"\n{name}: {table['title']}\n" + common.markdown_table(table["columns"], table["rows"]))
        for note in result.get("notes", []):
            print(f"- {note}")
    print(f"\nwrote {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
