"""Several JAX processes on one machine: tests/test_multihost.py starts this and checks what it writes.

  python tests/_multihost_worker.py OUT_PREFIX single             # 1 process x 8 devices, and 1 device
  python tests/_multihost_worker.py OUT_PREFIX multi PORT PID N   # process PID of N, 8 / N devices each
  python tests/_multihost_worker.py OUT_PREFIX die PORT PID N HB  # as multi, but process 1 dies after joining
  python tests/_multihost_worker.py OUT_PREFIX badwrite PORT PID N  # joins, then exports to a path that is a file

The parent sets ``XLA_FLAGS=--xla_force_host_platform_device_count=...`` and
``JAX_PLATFORMS=cpu``. Every process builds the same tiny Llama and adapter
values (the same seed), joins the others through
:func:`lora_jax.distributed.initialize` (multi), lays the base out with the
``fsdp`` rules on a mesh over all 8 devices, feeds its own rows of each
batch (:meth:`Plan.local_rows`), and trains ``STEPS`` steps. Then all
processes save a checkpoint (``OUT_PREFIX.<mode>.ckpt``), and export the
adapter (``.peft``) and the sharded merge as a Hugging Face folder
(``.merged``) through :mod:`lora_jax.distributed`, which writes each once.
Process 0 writes ``OUT_PREFIX.<mode>.json`` (losses, grad norms, the step's
collectives) and ``.npz`` (the final adapters, gathered from all processes);
every process writes ``OUT_PREFIX.<mode>.p<PID>.json`` (what its export
calls returned, or the error they raised).

The single run (run it second) also restores the multi run's checkpoint on one
device and on a 4 x 2 ``fsdp_tp`` mesh, and exports those restored adapters
with their merge, as one process, to ``OUT_PREFIX.of_multi.peft`` and
``.of_multi.merged``: the same values as the multi run's exports.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

import lora_jax.distributed as D

STEPS, BATCH, SEQ, DEVICES = 3, 8, 16, 8


def main(prefix: str, mode: str, port: str = "", pid: str = "0", count: str = "1", heartbeat: str = "100") -> None:
    if mode != "single":
        D.initialize(f"127.0.0.1:{port}", int(count), int(pid), timeout_s=60, heartbeat_timeout_s=int(heartbeat))
        if mode == "die" and pid == "1":
            os._exit(3)     # gone without a word, as a killed host
    import jax

    jax.config.update("jax_numpy_rank_promotion", "raise")   # as tests/conftest.py
    assert jax.device_count() == DEVICES, jax.devices()
    t0 = time.perf_counter()
    run = Setup()
    if mode == "badwrite":
        return _bad_write(prefix, run)
    result, arrays = run.train()
    if mode != "die":     # every process takes part in the save (orbax writes each shard from its holder)
        result["exports"] = run.save(f"{prefix}.{mode}", run.lora_s, run.opt_s)
    if mode == "single":
        arrays.update(run.from_multi_checkpoint(prefix, result))
    result["seconds"] = time.perf_counter() - t0
    _write(prefix, mode, result, arrays)
    if mode != "single":
        jax.distributed.shutdown()


class Setup:
    """The tiny model, adapters, data, optimizer and fsdp plan every process builds identically."""

    def __init__(self):
        import jax
        import optax

        import lora_jax as L
        from lora_jax import sharding as S
        from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM, causal_lm_loss

        self.model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                                  num_hidden_layers=2, num_attention_heads=4))
        self.config = L.LoraConfig(rank=4, alpha=8, targets=("attention", "mlp"))
        rng = np.random.default_rng(0)
        ids = np.zeros((BATCH, SEQ), np.int32)
        values = lambda tree: jax.tree.map(lambda s: np.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), tree)
        self.base = values(jax.eval_shape(self.model.init, jax.random.key(0), ids)["params"])
        self.lora = values(jax.eval_shape(lambda: L.init_lora(self.model, self.base, self.config, ids,
                                                               rng=jax.random.key(1))))
        self.batches = [rng.integers(0, 128, (BATCH, SEQ)).astype(np.int32) for _ in range(STEPS)]
        self.tx = optax.sgd(0.5, momentum=0.9)    # SGD: Adam would magnify float32 noise in tiny gradient entries
        self.loss = lambda m, x: causal_lm_loss(m(x), x)
        self.plan = S.plan(S.make_mesh((DEVICES, 1)), self.base, self.lora, self.tx, "fsdp")
        self.base_s, self.lora_s, self.opt_s = self.plan.place(self.base, self.lora, self.tx.init(self.lora))

    def train(self):
        import jax

        import lora_jax as L
        from lora_jax import sharding as S

        plan = self.plan
        step = S.make_sharded_train_step(L.lora_apply(self.model, self.config), self.loss, self.tx, plan)
        batch = lambda i: plan.shard_batch(plan.local_rows(self.batches[i]))
        comms = S.collectives(step.lower(self.lora_s, self.opt_s, self.base_s, batch(0)).compile())
        losses, norms = [], []
        for i in range(STEPS):
            self.lora_s, self.opt_s, metrics = step(self.lora_s, self.opt_s, self.base_s, batch(i))
            losses.append(float(metrics["loss"]))
            norms.append(float(metrics["grad_norm"]))
        result = {"process_count": jax.process_count(), "devices": jax.device_count(),
                  "local_devices": jax.local_device_count(), "local_rows": int(plan.local_rows(self.batches[0]).shape[0]),
                  "losses": losses, "grad_norms": norms,
                  "collectives": {"counts": comms.counts(), "bytes": comms.bytes()}}
        return result, _named("sharded", D.gather(self.lora_s))

    def save(self, prefix: str, lora_s, opt_s, *, checkpoint: bool = True) -> dict:
        """Checkpoint (every process), PEFT export and merged folder (written once); what each call returned."""
        from lora_jax import sharding as S
        from lora_jax.io.checkpoint import Checkpointer, TrainState

        if checkpoint:
            with Checkpointer(f"{prefix}.ckpt") as ckpt:
                ckpt.save(TrainState(lora_s, opt_s, step=STEPS))
        merged = S.sharded_merge(self.base_s, lora_s, self.config)
        return {"peft": D.save_peft(f"{prefix}.peft", self.base_s, lora_s, self.config),
                "merged": D.save_pretrained(f"{prefix}.merged", self.model.config, merged)}

    def from_multi_checkpoint(self, prefix: str, result: dict) -> dict:
        """The multi run's checkpoint restored on one device and on a 4 x 2 mesh, and exported by one process."""
        import jax
        from jax.sharding import SingleDeviceSharding

        import lora_jax as L
        from lora_jax import sharding as S
        from lora_jax.io.checkpoint import Checkpointer, TrainState

        opt = self.tx.init(self.lora)
        one = SingleDeviceSharding(jax.devices()[0])
        on_one = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=one), tree)
        other = S.plan(S.make_mesh((4, 2)), self.base, self.lora, self.tx, "fsdp_tp")
        with Checkpointer(f"{prefix}.multi.ckpt") as ckpt:
            restored = ckpt.restore(TrainState(on_one(self.lora), on_one(opt), 0))
            remeshed = ckpt.restore(TrainState(*other.abstract(self.lora, opt), 0))
            again = ckpt.restore(TrainState(*self.plan.abstract(self.lora, opt), 0))
        result["restored_step"] = int(restored.step)
        result["remeshed_shardings_kept"] = all(
            a.sharding.is_equivalent_to(s, a.ndim)
            for a, s in zip(jax.tree.leaves((remeshed.lora_params, remeshed.opt_state)),
                            jax.tree.leaves((other.lora_params, other.opt_state))))
        # the multi run's values, exported by this one process
        result["exports_of_multi"] = self.save(f"{prefix}.of_multi", again.lora_params, again.opt_state,
                                               checkpoint=False)
        merged_one = L.merge(jax.device_put(self.base, one), restored.lora_params, self.config)
        arrays = {**_named("restored", restored.lora_params), **_named("remeshed", D.gather(remeshed.lora_params)),
                  **_named("merged_one", merged_one)}
        # the same steps on one device, unsharded
        ref, ref_opt = jax.device_put((self.lora, opt), one)
        plain = L.make_train_step(L.lora_apply(self.model, self.config), self.loss, self.tx)
        result["one_device_losses"] = []
        for batch in self.batches:
            ref, ref_opt, metrics = plain(ref, ref_opt, jax.device_put(self.base, one), batch)
            result["one_device_losses"].append(float(metrics["loss"]))
        return {**arrays, **_named("one", jax.device_get(ref))}


def _bad_write(prefix: str, run: Setup) -> None:
    """Every process exports to a path that is a file: process 0 fails, the others must fail with its reason."""
    import jax

    target = f"{prefix}.badwrite.file"
    if jax.process_index() == 0:
        with open(target, "w") as f:
            f.write("not a folder")
    try:
        D.save_peft(target, run.base_s, run.lora_s, run.config)
        outcome = {"error": None}
    except Exception as err:  # noqa: BLE001 -- recorded for the test to check
        outcome = {"error": type(err).__name__, "message": str(err)}
    with open(f"{prefix}.badwrite.p{jax.process_index()}.json", "w") as f:
        json.dump(outcome, f)
    jax.distributed.shutdown()


def _named(prefix: str, tree) -> dict:
    import jax

    return {f"{prefix}/" + jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _write(prefix: str, mode: str, result: dict, arrays: dict) -> None:
    import jax

    me = jax.process_index()
    with open(f"{prefix}.{mode}.p{me}.json", "w") as f:
        json.dump(result.get("exports"), f)
    if me == 0:
        np.savez(f"{prefix}.{mode}.npz", **arrays)
        with open(f"{prefix}.{mode}.json", "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
