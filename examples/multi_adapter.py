"""Multi-adapter serving: one base, three adapters trained on different data, switched and mixed per request.

  1. load the demo's pretrained base: a small byte-level Llama (vocabulary 256) that knows English prose;
  2. train three LoRA adapters on it, each on its own corpus: prose (the standard library's docstrings),
     code (its source) and "shout" (the same prose in capitals: a style the base has rarely seen).
     Same layers and rank for all three, different alphas (8, 16, 32 by default; a train step
     compiles once per distinct config);
  3. put them in an AdapterSet, which checks each one against the base's shapes;
  4. per-request switching: ONE jitted forward serves all three adapters, because the resolved adapter's
     config has scale 1 (each alpha rides on its factors) and so depends only on the structure. Prints
     every adapter's held-out loss on every corpus, the base model's, and how often the forward compiled;
  5. mixed batch: the adapters stacked on a new axis, one forward over a batch whose rows use different
     adapters (or none); each row is checked against running it alone with its own adapter and alpha;
  6. combine prose + code into one adapter (0.5 each) by the three methods: "cat" (exact, rank 16),
     "svd" (best rank 8) and "linear" (PEFT's cheap mix, not exact); prints each one's error and losses.

The base was pretrained on the prose train split (all of it; the prose adapter's is a part), so that
adapter has little to learn: its row shows what a few noisy steps cost on the base's own language.
Code and capitals are new to the base. Every corpus is built from the Python installation itself;
nothing is downloaded.

Run from the repository root:  python examples/multi_adapter.py [--steps 40] [--alphas 8 16 32] [--seed 0]
(about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import optax

import lora_jax
from lora_jax.app.demo import data
from lora_jax.app.demo.pretrain import load_base
from lora_jax.models.llama import causal_lm_loss

NAMES = ("prose", "code", "shout")


def load_corpora(args) -> dict:
    """The three corpora, small (whole files up to the caps), each split by file into train and held-out."""
    caps = dict(heldout_bytes=args.heldout_bytes)
    prose = data.prose_corpus(args.max_bytes, **caps)
    shout = dataclasses.replace(prose, name="shout", train=prose.train.upper(), heldout=prose.heldout.upper(),
                                source="the prose corpus above, in capitals")
    return {"prose": prose, "code": data.code_corpus(args.max_bytes, **caps), "shout": shout}


def loss_fn(model, ids):
    # make_train_step hands us `model(*args)` == apply(base, lora, *args).
    return causal_lm_loss(model(ids), ids)


def train_adapter(module, base, corpus, alpha: float, args, seed: int, steps: dict):
    """A rank-``args.rank`` adapter on attention + MLP, trained on ``corpus.train``; returns ``(config, lora)``.

    ``steps`` caches the jitted train step per config: adapters with equal configs share one compilation.
    """
    batches = data.train_batches(corpus.train, seq_len=args.seq_len, batch_size=args.batch_size, seed=seed)
    first = jnp.asarray(next(batches))
    config = lora_jax.LoraConfig(rank=args.rank, alpha=alpha, targets=("attention", "mlp"))
    scale = alpha / args.rank   # config.scaling(layer) at every layer: no rank or alpha patterns here
    lora = lora_jax.init_lora(module, base, config, first, rng=jax.random.key(seed))
    # Adam moves each factor entry by about lr per step and the delta is scale * A @ B, so a
    # larger alpha learns faster at the same rate; lr / scale keeps the runs comparable.
    tx = optax.adamw(args.lr / scale)
    if config not in steps:
        steps[config] = lora_jax.make_train_step(lora_jax.lora_apply(module, config), loss_fn, tx)
    step = steps[config]
    opt_state = tx.init(lora)
    batch = first
    for i in range(1, args.steps + 1):
        lora, opt_state, metrics = step(lora, opt_state, base, batch)
        if i == 1 or i == args.steps:
            print(f"  {corpus.name:>11} (alpha {alpha:g}, scale {scale:g})  step {i:3d}  "
                  f"train loss {float(metrics['loss']):.4f}")
        batch = jnp.asarray(next(batches))
    return config, lora


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per adapter (default 40)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of all three adapters (default 8)")
    parser.add_argument("--alphas", type=float, nargs=3, default=[8.0, 16.0, 32.0], metavar="ALPHA",
                        help="LoRA alpha of the prose, code and shout adapters (default 8 16 32)")
    parser.add_argument("--lr", type=float, default=5e-3, help="AdamW rate at scale 1 (default 5e-3)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per training step (default 8)")
    parser.add_argument("--seq-len", type=int, default=128, help="bytes per window (default 128)")
    parser.add_argument("--eval-rows", type=int, default=32,
                        help="held-out windows per corpus for the losses (default 32)")
    parser.add_argument("--max-bytes", type=int, default=300_000, help="train bytes per corpus (default 300000)")
    parser.add_argument("--heldout-bytes", type=int, default=200_000,
                        help="held-out bytes per corpus (default 200000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of adapters and batches (default 0)")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    # 1. The base: a Hugging Face folder (bfloat16 weights) shipped with the demo, read as float32.
    module, base = load_base()
    corpora = load_corpora(args)
    for corpus in corpora.values():
        print(corpus.summary())
    # Fixed held-out windows per corpus, one [eval_rows, seq_len] array each (same shape: one compile).
    heldout = {name: jnp.asarray(data.eval_windows(c.heldout, seq_len=args.seq_len, batch_size=args.eval_rows,
                                                   n_batches=1)[0]) for name, c in corpora.items()}

    # 2. Three adapters, same structure, different data and alphas.
    print(f"\ntraining 3 adapters, rank {args.rank} on attention + mlp, {args.steps} steps each")
    alphas, train_steps = dict(zip(NAMES, args.alphas)), {}
    trained = {name: train_adapter(module, base, corpora[name], alphas[name], args, args.seed + i, train_steps)
               for i, name in enumerate(NAMES)}
    print(f"train steps compiled: {sum(s._cache_size() for s in train_steps.values())} "
          f"(one per distinct config)")

    # 3. The set keeps the base's shapes only, and checks every adapter against them.
    aset = lora_jax.AdapterSet(base)
    for name, (config, lora) in trained.items():
        aset = aset.add(name, lora, config)
    print(f"\n{aset}")

    # 4. Per-request switching. resolve() folds the adapter's scale into its factors: the config it
    #    returns has scale 1 and depends only on the adapted layers and ranks, the same for all three.
    resolved = {name: aset.activate(name).resolve() for name in NAMES}
    cfg = resolved[NAMES[0]].config
    print(f"resolved configs identical for all 3 adapters (alphas {' '.join(f'{a:g}' for a in args.alphas)}): "
          f"{all(r.config == cfg for r in resolved.values())}")
    fwd = jax.jit(lora_jax.lora_apply(module, cfg))
    plain = jax.jit(lambda params, ids: module.apply({"params": params}, ids))   # no adapter: the module as is

    losses = {}
    for name in (None, *NAMES):   # one request each: the base model (no adapter active), then each adapter
        adapter = aset.disable().resolve() if name is None else resolved[name]   # disabled: None
        losses[name] = {}
        for corpus, ids in heldout.items():
            logits = plain(base, ids) if adapter is None else fwd(base, adapter.lora_params, ids)
            losses[name][corpus] = float(causal_lm_loss(logits, ids))
    print(f"\nheld-out loss (nats/byte), {args.eval_rows} windows of {args.seq_len} bytes per corpus")
    print(f"{'adapter':>13} " + " ".join(f"{c:>12}" for c in NAMES))
    for name, row in losses.items():
        print(f"{name or 'base (none)':>13} " + " ".join(f"{row[c]:12.4f}" for c in NAMES))
    best = {c: min(NAMES, key=lambda n: losses[n][c]) for c in NAMES}
    print("best adapter per corpus: " + ", ".join(f"{c} -> {n}" for c, n in best.items()))
    print(f"compilations of the switching forward after 3 adapters: {fwd._cache_size()}")

    # 5. A mixed batch: one forward, each row with its own adapter (None: the base model).
    stacked = aset.stack()
    mixed = jax.jit(lora_jax.lora_apply(module, stacked.config))
    rows = [("prose", "prose"), ("code", "code"), ("shout", "shout"), (None, "prose"),
            ("code", "shout"), ("shout", "code")]            # (adapter, text of the row)
    batch = jnp.stack([heldout[text][i % args.eval_rows] for i, (_, text) in enumerate(rows)])
    ids = stacked.ids([adapter for adapter, _ in rows])
    logits = mixed(base, stacked.lora_params, batch, adapter_ids=ids)
    # The reference for each row: that row alone, through the plain module with its own adapter
    # merged into the weights (W + alpha/r * A @ B with the adapter's own alpha).
    merged = {name: lora_jax.merge(base, aset[name].lora_params, aset[name].config) for name in NAMES}
    diffs = []
    for i, (adapter, _) in enumerate(rows):
        row = batch[i:i + 1]
        expected = plain(base if adapter is None else merged[adapter], row)
        diffs.append(float(jnp.max(jnp.abs(logits[i:i + 1] - expected))))
    print(f"\nstack: slots {stacked.names}, adapter_ids {ids.tolist()}")
    print(f"mixed batch of {len(rows)} rows: max |logit diff| vs each row alone, merged {max(diffs):.3g} "
          f"(max |logit| {float(jnp.max(jnp.abs(logits))):.3g})")
    print(f"rows without adapter vs the base model: max |logit diff| "
          f"{max(d for d, (adapter, _) in zip(diffs, rows) if adapter is None):.3g}")
    print(f"compilations of the mixed forward: {mixed._cache_size()}")

    # 6. One adapter from two: 0.5 * prose + 0.5 * code, three ways. Merged into the weights, any
    #    combination runs on the unmodified module (compiled already).
    print("\ncombine 0.5 * prose + 0.5 * code:")
    for method in ("cat", "svd", "linear"):
        combined = lora_jax.combine(base, [aset["prose"], aset["code"]], [0.5, 0.5], method=method)
        rank = combined.config.rank_for(next(iter(combined.errors)))
        merged = lora_jax.merge(base, combined.lora_params, combined.config)
        loss = {c: float(causal_lm_loss(plain(merged, heldout[c]), heldout[c])) for c in ("prose", "code")}
        line = (f"combine {method}: max relative error {max(combined.errors.values()):.3g} over "
                f"{len(combined.errors)} layers, rank {rank}; held-out loss prose {loss['prose']:.4f}, "
                f"code {loss['code']:.4f}")
        if combined.config == cfg:   # svd and linear keep rank 8 (scale 1): the switching forward serves them
            unmerged = float(causal_lm_loss(fwd(base, combined.lora_params, heldout["prose"]), heldout["prose"]))
            line += f" (unmerged on the switching forward: prose {unmerged:.4f})"
        print(line)
    print(f"compilations of the switching forward after combining: {fwd._cache_size()}")
    print(f"\ndone in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
