"""Several JAX processes on one machine: tests/test_multihost.py starts this and checks what it writes.

  python tests/_multihost_worker.py OUT_PREFIX single            # 1 process x 8 devices, and 1 device
  python tests/_multihost_worker.py OUT_PREFIX multi PORT PID N  # process PID of N, 8 / N devices each
  python tests/_multihost_worker.py OUT_PREFIX die PORT PID N HB # as multi, but process 1 dies after joining

The parent sets ``XLA_FLAGS=--xla_force_host_platform_device_count=...`` and
``JAX_PLATFORMS=cpu``. Every process builds the same tiny Llama and adapter
values (the same seed), joins the others through
:func:`lora_jax.distributed.initialize` (multi), lays the base out with the
``fsdp`` rules on a mesh over all 8 devices, feeds its own rows of each
batch, and trains ``STEPS`` steps, then all processes save a checkpoint
(``OUT_PREFIX.<mode>.ckpt``). Process 0 writes ``OUT_PREFIX.<mode>.json``
(losses, grad norms, the step's collectives) and ``.npz`` (the final adapters,
gathered from all processes). The single run also restores the multi run's
checkpoint onto one device (run it second).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

import lora_jax.distributed as D

STEPS, BATCH, SEQ, DEVICES = 3, 8, 16, 8


def main(prefix: str, mode: str, port: str = "", pid: str = "0", count: str = "1", heartbeat: str = "100") -> None:
    if mode in ("multi", "die"):
        D.initialize(f"127.0.0.1:{port}", int(count), int(pid), timeout_s=60, heartbeat_timeout_s=int(heartbeat))
        if mode == "die" and pid == "1":
            import os
            os._exit(3)     # gone without a word, as a killed host
    import jax
    import optax
    from jax.experimental import multihost_utils

    import lora_jax as L
    from lora_jax import sharding as S
    from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM, causal_lm_loss

    t0 = time.perf_counter()
    jax.config.update("jax_numpy_rank_promotion", "raise")   # as tests/conftest.py
    assert jax.device_count() == DEVICES, jax.devices()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4))
    config = L.LoraConfig(rank=4, alpha=8, targets=("attention", "mlp"))
    rng = np.random.default_rng(0)
    ids = np.zeros((BATCH, SEQ), np.int32)
    values = lambda tree: jax.tree.map(lambda s: np.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), tree)
    base = values(jax.eval_shape(model.init, jax.random.key(0), ids)["params"])
    lora = values(jax.eval_shape(lambda: L.init_lora(model, base, config, ids, rng=jax.random.key(1))))
    batches = [rng.integers(0, 128, (BATCH, SEQ)).astype(np.int32) for _ in range(STEPS)]
    tx = optax.sgd(0.5, momentum=0.9)    # SGD: Adam would magnify float32 noise in tiny gradient entries
    loss = lambda m, x: causal_lm_loss(m(x), x)
    me, n = jax.process_index(), jax.process_count()
    rows = BATCH // n
    result = {"process_count": n, "devices": jax.device_count(), "local_devices": jax.local_device_count()}

    mesh = S.make_mesh((DEVICES, 1))
    plan = S.plan(mesh, base, lora, tx, "fsdp")
    b_s, lo_s, opt_s = plan.place(base, lora, tx.init(lora))
    step = S.make_sharded_train_step(L.lora_apply(model, config), loss, tx, plan)
    compiled = step.lower(lo_s, opt_s, b_s, plan.shard_batch(batches[0][me * rows:(me + 1) * rows])).compile()
    comms = S.collectives(compiled)
    losses, norms = [], []
    for batch in batches:
        lo_s, opt_s, metrics = step(lo_s, opt_s, b_s, plan.shard_batch(batch[me * rows:(me + 1) * rows]))
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    final = multihost_utils.process_allgather(lo_s, tiled=True)
    if mode != "die":     # every process takes part in the save (orbax writes each shard from its holder)
        from lora_jax.io.checkpoint import Checkpointer, TrainState

        with Checkpointer(f"{prefix}.{mode}.ckpt") as ckpt:
            ckpt.save(TrainState(lo_s, opt_s, step=STEPS))
    result.update(losses=losses, grad_norms=norms, collectives={"counts": comms.counts(), "bytes": comms.bytes()})

    arrays = {"sharded/" + jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v)
              for k, v in jax.tree_util.tree_flatten_with_path(final)[0]}
    if mode == "single":    # the one-device run of the same steps, and the 2-process checkpoint restored here
        restored = _restore_on_one_device(f"{prefix}.multi.ckpt", lora, tx.init(lora))
        arrays.update({"restored/" + jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v)
                       for k, v in jax.tree_util.tree_flatten_with_path(restored.lora_params)[0]})
        result["restored_step"] = int(restored.step)
        one = jax.devices()[0]
        ref, ref_opt = jax.device_put((lora, tx.init(lora)), one)
        plain = L.make_train_step(L.lora_apply(model, config), loss, tx)
        ref_losses = []
        for batch in batches:
            ref, ref_opt, metrics = plain(ref, ref_opt, jax.device_put(base, one), batch)
            ref_losses.append(float(metrics["loss"]))
        result["one_device_losses"] = ref_losses
        arrays.update({"one/" + jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v)
                       for k, v in jax.tree_util.tree_flatten_with_path(jax.device_get(ref))[0]})
    result["seconds"] = time.perf_counter() - t0
    if me == 0:
        np.savez(f"{prefix}.{mode}.npz", **arrays)
        with open(f"{prefix}.{mode}.json", "w") as f:
            json.dump(result, f, indent=1)
    if mode != "single":
        jax.distributed.shutdown()


def _restore_on_one_device(directory, lora, opt_state):
    """The newest step of ``directory`` restored onto this process's first device."""
    import jax
    from jax.sharding import SingleDeviceSharding

    from lora_jax.io.checkpoint import Checkpointer, TrainState

    one = SingleDeviceSharding(jax.devices()[0])
    like = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=one),
                                     tree)
    with Checkpointer(directory) as ckpt:
        return ckpt.restore(TrainState(like(lora), like(opt_state), 0))


if __name__ == "__main__":
    main(*sys.argv[1:])
