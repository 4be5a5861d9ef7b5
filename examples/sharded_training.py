"""Sharded LoRA training on a 4x2 (data, model) mesh: FSDP + tensor parallelism, on 8 devices.

  1. lay out the frozen base over the mesh by rules (here "fsdp_tp": Megatron's
     column/row split of each Llama block over "model", the other dim over "data");
  2. derive the adapters' shardings from it (A follows the kernel's input dim,
     B its output dim, the rank is replicated) and the optimizer state's;
  3. train with the batch split over "data", and count the collectives XLA put
     into the compiled step;
  4. merge the adapters into the sharded base (nothing is gathered) and check it
     against the merge on one device;
  5. with ``--out DIR``: write the adapter (PEFT format) and the merged model
     (a Hugging Face folder), once, however many processes run.

Without accelerators it runs on 8 CPU devices that XLA fakes (it sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX starts,
unless you set XLA_FLAGS yourself).

The same script runs on several processes (hosts, or processes on one
machine): start it once per process with the coordinator settings in the
environment (``LORA_JAX_COORDINATOR_ADDRESS``, ``LORA_JAX_NUM_PROCESSES``,
``LORA_JAX_PROCESS_ID``; see :mod:`lora_jax.distributed` and the README's
"Several hosts"). The mesh then spans every process's devices, each process
feeds its own rows of the batch, and process 0 writes ``--out``. Two processes
with 4 CPU devices each, on one machine::

  for i in 0 1; do XLA_FLAGS=--xla_force_host_platform_device_count=4 LORA_JAX_COORDINATOR_ADDRESS=127.0.0.1:12355 \
      LORA_JAX_NUM_PROCESSES=2 LORA_JAX_PROCESS_ID=$i python examples/sharded_training.py & done; wait

Run from the repository root:  python examples/sharded_training.py [--steps 30] [--mesh 4x2] [--strategy fsdp_tp]
"""

from __future__ import annotations

import os

if "XLA_FLAGS" not in os.environ:          # must happen before JAX starts; harmless with accelerators
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import argparse
import builtins
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from lora_jax import distributed, sharding
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM, causal_lm_loss

VOCAB, SEQ, BATCH, PERIOD = 256, 32, 16, 12


def show(tree, paths, title):
    print(title)
    flat = {jax.tree_util.keystr(kp, simple=True, separator="/"): leaf
            for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    for path in paths:
        leaf = flat[path]
        print(f"  {path:42s} {str(list(leaf.shape)):14s} {tuple(leaf.sharding.spec)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    parser.add_argument("--mesh", default="4x2", help="data x model devices (default 4x2)")
    parser.add_argument("--strategy", default="fsdp_tp", choices=sharding.STRATEGIES)
    parser.add_argument("--scan", action="store_true", help="scan over the layers (params get a layer axis)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", metavar="DIR",
                        help="write DIR/adapter (PEFT) and DIR/merged (Hugging Face folder), once")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    here = distributed.initialize()     # joins the other processes if the environment names them; else nothing
    print = builtins.print if here.is_main else (lambda *a, **k: None)    # one report, from process 0
    shape = tuple(int(n) for n in args.mesh.split("x"))
    n = int(np.prod(shape))
    if here.num_processes > 1 and n != jax.device_count():
        raise SystemExit(f"--mesh {args.mesh} has {n} devices; with {here.num_processes} processes it must use all "
                         f"{jax.device_count()} (each process's devices)")
    devices = jax.devices() if jax.device_count() >= n else jax.devices("cpu")
    mesh = sharding.make_mesh(shape, ("data", "model"), devices=devices[:n])
    print(f"mesh {dict(mesh.shape)} over {n} {devices[0].platform} devices; {here.num_processes} process(es)")

    model_config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, scan_layers=args.scan)
    model = LlamaForCausalLM(model_config)
    config = lora_jax.LoraConfig(rank=8, alpha=16, targets=("attention", "mlp", "lm_head"))
    ids = jnp.zeros((BATCH, SEQ), jnp.int32)
    key_model, key_lora = jax.random.split(jax.random.key(args.seed))
    # Created on one device here; a model too large for one would be created under
    # jax.jit(model.init, out_shardings=...) straight into its shards.
    base = jax.jit(model.init)(key_model, ids)["params"]
    lora = lora_jax.init_lora(model, base, config, ids, rng=key_lora)
    tx = optax.adamw(1e-2)

    # 1-2. the plan: shardings of the base (by rules), the adapters and the optimizer state (derived)
    plan = sharding.plan(mesh, base, lora, tx, args.strategy)
    base_s, lora_s, opt_s = plan.place(base, lora, tx.init(lora))
    layer = "model/layers" if args.scan else "model/layers_0"
    show(base_s, ["model/embed_tokens/embedding", f"{layer}/self_attn/q_proj/kernel",
                  f"{layer}/self_attn/o_proj/kernel", f"{layer}/mlp/down_proj/kernel", "lm_head/kernel",
                  "model/norm/weight"], "base params: shape, PartitionSpec")
    show(lora_s, [f"{layer}/self_attn/q_proj/a", f"{layer}/self_attn/q_proj/b", f"{layer}/self_attn/o_proj/a",
                  f"{layer}/self_attn/o_proj/b", "lm_head/a", "lm_head/b"], "adapters: shape, PartitionSpec")

    # 3. the sharded step; every layer's input stays split over the batch as the plan splits it
    #    (left to itself, XLA's propagation may replicate the batch inside the layers).
    #    The task: continue a fixed repeating token pattern.
    sharded_model = LlamaForCausalLM(dataclasses.replace(model_config, activation_sharding=plan.batch))
    step = sharding.make_sharded_train_step(lora_jax.lora_apply(sharded_model, config),
                                            lambda m, x: causal_lm_loss(m(x), x), tx, plan)
    rng = np.random.default_rng(args.seed)
    pattern = rng.permutation(VOCAB)[:PERIOD]
    # every process draws the same global batch and feeds its own rows of it
    batch_of = lambda: plan.shard_batch(plan.local_rows(
        pattern[(rng.integers(0, PERIOD, (BATCH, 1)) + np.arange(SEQ)) % PERIOD].astype(np.int32)))
    compiled = step.lower(lora_s, opt_s, base_s, batch_of()).compile()
    comms = sharding.collectives(compiled)
    counts, nbytes = comms.counts(), comms.bytes()
    print("collectives per step (from the compiled HLO; bytes are each op's result on one device):")
    for kind in counts:
        print(f"  {kind:20s} {counts[kind]:4d} ops {nbytes[kind]:>12,} bytes")
    losses = []
    for _ in range(args.steps):
        lora_s, opt_s, metrics = step(lora_s, opt_s, base_s, batch_of())
        losses.append(float(metrics["loss"]))
    shown = sorted({0, 1, 2, len(losses) // 2, len(losses) - 1} & set(range(len(losses))))
    print("loss: " + ", ".join(f"step {i + 1} {losses[i]:.5f}" for i in shown))

    # 4. merge into the sharded base: each merged kernel keeps its sharding, nothing is gathered
    merge = sharding.make_sharded_merge(config, plan.base_params)
    merge_compiled = merge.lower(base_s, lora_s).compile()
    merged = merge_compiled(base_s, lora_s)
    gathered = sharding.collectives(merge_compiled).counts().get("all-gather", 0)
    kept = all(m.sharding.is_equivalent_to(s, m.ndim) for m, s in zip(jax.tree.leaves(merged),
                                                                        jax.tree.leaves(plan.base_params)))
    one = jax.local_devices()[0]
    # gather: the adapters and merged weights may be spread over several processes
    expected = jax.jit(lambda b, l: lora_jax.merge(b, l, config))(jax.device_put(base, one),
                                                                   jax.device_put(distributed.gather(lora_s), one))
    diff = max(float(np.max(np.abs(a - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(distributed.gather(merged)), jax.tree.leaves(expected)))
    print(f"sharded merge: shardings kept {kept}, all-gathers {gathered}, "
          f"max |diff| vs merge on one device {diff:.3g}")

    # 5. files meant to exist once: every process calls, process 0 writes, all return when they are complete
    if args.out:
        adapter = distributed.save_peft(os.path.join(args.out, "adapter"), base_s, lora_s, config)
        folder = distributed.save_pretrained(os.path.join(args.out, "merged"), model_config, merged)
        if here.is_main:    # the others get None: they wrote nothing
            print(f"wrote {args.out}/adapter ({', '.join(adapter)}) and {args.out}/merged ({', '.join(folder)})")
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
