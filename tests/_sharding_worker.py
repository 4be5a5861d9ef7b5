"""Sharded LoRA on 8 fake CPU devices; tests/test_sharding.py runs this once and checks what it writes.

The parent sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (JAX
reads it when it starts). A tiny Llama is trained for a few steps on one
device and on each mesh/strategy of ``CASES``, from the same values; the
worker writes a JSON of losses, adapter differences, the specs of the LoRA
tree, the collectives of each compiled step, a sharded merge against the
unsharded one, and an orbax round trip of a sharded adapter.

  python tests/_sharding_worker.py OUT.json CKPT_DIR [--all]
"""

from __future__ import annotations

import json
import sys
import time

import jax
import numpy as np
import optax

import lora_jax as L
from lora_jax import sharding as S
from lora_jax.io.checkpoint import Checkpointer, TrainState
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM, causal_lm_loss

MODEL = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4)
LORA = L.LoraConfig(rank=4, alpha=8, targets=("attention", "mlp", "embedding", "lm_head"))
BATCH, SEQ, STEPS = 8, 16, 3
#: name -> (mesh shape (data, model), strategy, scan_layers); ``--all`` adds EXTRA_CASES (for the README's table)
CASES = {"8x1 fsdp": ((8, 1), "fsdp", False),
         "4x2 fsdp_tp": ((4, 2), "fsdp_tp", False), "2x4 fsdp_tp scan": ((2, 4), "fsdp_tp", True),
         "2x4 tp": ((2, 4), "tp", False)}
EXTRA_CASES = {"8x1 dp": ((8, 1), "dp", False)}
MERGE_CASES = ("2x4 tp", "2x4 fsdp_tp scan")
CHECKPOINT_CASE = "2x4 fsdp_tp scan"


def _values(tree, rng, scale):
    return jax.tree.map(lambda s: np.asarray(scale * rng.standard_normal(s.shape), s.dtype), tree)


def _stack_layers(tree):
    """The unrolled ``model/layers_i`` subtrees as one ``model/layers`` with a leading layer axis."""
    inner = dict(tree["model"])
    layers = [inner.pop(f"layers_{i}") for i in range(MODEL.num_hidden_layers)]
    inner["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    return {**tree, "model": inner}


def _unstack_layers(tree):
    inner = dict(tree["model"])
    stacked = inner.pop("layers")
    for i in range(MODEL.num_hidden_layers):
        inner[f"layers_{i}"] = jax.tree.map(lambda x: x[i], stacked)
    return {**tree, "model": inner}


def _flat(tree):
    return {jax.tree_util.keystr(kp, simple=True, separator="/"): leaf
            for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _max_rel(actual, expected):
    a, e = _flat(jax.device_get(actual)), _flat(jax.device_get(expected))
    assert a.keys() == e.keys()
    diff = max(float(np.max(np.abs(np.asarray(a[k], np.float64) - e[k]))) for k in e)
    peak = max(float(np.max(np.abs(e[k]))) for k in e)
    return diff, peak


def _spec(sharding):
    return [list(e) if isinstance(e, tuple) else e for e in sharding.spec]


def _kernel_bytes(base):
    return sorted({int(np.asarray(x).nbytes) for x in jax.tree.leaves(base) if np.ndim(x) >= 2})


def main(out_path, ckpt_dir, extra=False):
    t0 = time.perf_counter()
    jax.config.update("jax_numpy_rank_promotion", "raise")   # as tests/conftest.py
    jax.config.update("jax_default_prng_impl", "rbg")
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    ids = np.zeros((BATCH, SEQ), np.int32)
    model = LlamaForCausalLM(MODEL)
    base = _values(jax.eval_shape(model.init, jax.random.key(0), ids)["params"], rng, 0.1)
    lora = _values(jax.eval_shape(lambda: L.init_lora(model, base, LORA, ids, rng=jax.random.key(1))), rng, 0.1)
    batches = [rng.integers(0, MODEL.vocab_size, (BATCH, SEQ)).astype(np.int32) for _ in range(STEPS)]
    # SGD, not Adam: Adam divides each gradient entry by its own magnitude, so the float32 noise of the
    # tiny entries (relative 1e-3 for entries 1e-4 of the largest) would become differences of lr * 1e-3
    # in the adapters, though the gradients agree to 4e-7 of their largest entry. The clip is active
    # (the gradient norm is ~0.07), so the global norm over all shards is checked too.
    tx = optax.chain(optax.clip_by_global_norm(0.01), optax.sgd(1.0, momentum=0.9))
    loss = lambda m, x: causal_lm_loss(m(x), x)
    result = {"steps": STEPS, "cases": {}, "merge": {}}

    # the single-device reference
    one = jax.devices()[0]
    ref_lora, ref_opt = jax.device_put((lora, tx.init(lora)), one)
    step = L.make_train_step(L.lora_apply(model, LORA), loss, tx)
    ref_losses, ref_norms = [], []
    for batch in batches:
        ref_lora, ref_opt, metrics = step(ref_lora, ref_opt, jax.device_put(base, one), batch)
        ref_losses.append(float(metrics["loss"]))
        ref_norms.append(float(metrics["grad_norm"]))
    result["reference_losses"], result["reference_grad_norms"] = ref_losses, ref_norms
    ref_lora = jax.device_get(ref_lora)
    ref_update = jax.tree.map(lambda x, x0: np.asarray(x, np.float64) - x0, ref_lora, lora)
    result["t_reference"] = time.perf_counter() - t0

    placed = {}
    for name, (shape, strategy, scan) in {**CASES, **(EXTRA_CASES if extra else {})}.items():
        t1 = time.perf_counter()
        mesh = S.make_mesh(shape)
        b, lo = (_stack_layers(base), _stack_layers(lora)) if scan else (base, lora)
        plan = S.plan(mesh, b, lo, tx, strategy)
        # every layer's input split over the batch, as the plan splits the batch
        model = LlamaForCausalLM(LlamaConfig(**{**MODEL.__dict__, "scan_layers": scan,
                                                "activation_sharding": plan.batch}))
        b_s, lo_s, opt_s = plan.place(b, lo, tx.init(lo))
        step = S.make_sharded_train_step(L.lora_apply(model, LORA), loss, tx, plan)
        t2 = time.perf_counter()
        lowered = step.lower(lo_s, opt_s, b_s, plan.shard_batch(batches[0]))
        t3 = time.perf_counter()
        compiled = lowered.compile()
        t4 = time.perf_counter()
        comms = S.collectives(compiled)
        losses, norms = [], []
        for batch in batches:
            # the public call path; it reuses the executable compiled above
            lo_s, opt_s, metrics = step(lo_s, opt_s, b_s, plan.shard_batch(batch))
            losses.append(float(metrics["loss"]))
            norms.append(float(metrics["grad_norm"]))
        final = jax.device_get(lo_s)
        final = _unstack_layers(final) if scan else final
        diff, peak = _max_rel(final, ref_lora)
        update_diff, update_peak = _max_rel(jax.tree.map(lambda x, x0: np.asarray(x, np.float64) - x0, final, lora),
                                            ref_update)
        result["cases"][name] = {
            "mesh": list(shape), "strategy": strategy, "scan": scan, "losses": losses, "grad_norms": norms,
            "lora_max_abs_diff": diff, "lora_max_abs": peak,
            "update_max_abs_diff": update_diff, "update_max_abs": update_peak,
            "lora_specs": {k: _spec(v) for k, v in _flat(plan.lora_params).items()},
            "lora_actual_specs": {k: _spec(v.sharding) for k, v in _flat(lo_s).items()},
            "base_specs": {k: _spec(v) for k, v in _flat(plan.base).items()},
            "opt_state_specs": {k: _spec(v) for k, v in _flat(plan.opt_state).items()},
            "opt_state_actual_specs": {k: _spec(v.sharding) for k, v in _flat(opt_s).items()},
            "kernel_bytes": _kernel_bytes(b),
            "collectives": {"counts": comms.counts(), "bytes": comms.bytes(),
                            "static_counts": comms.counts(executed=False),
                            "all_gather_bytes": sorted({op.bytes for op in comms.ops if op.kind == "all-gather"})},
            "seconds": {"plan": t2 - t1, "lower": t3 - t2, "compile": t4 - t3, "rest": time.perf_counter() - t4}}
        placed[name] = (plan, b_s, lo_s, opt_s)

    # sharded merge == unsharded merge, with every merged weight on its base sharding
    t1 = time.perf_counter()
    unsharded = jax.jit(lambda b, l: L.merge(b, l, LORA))
    expected = jax.device_get(unsharded(jax.device_put(base, one), jax.device_put(ref_lora, one)))
    for name in MERGE_CASES:
        plan, b_s, _, _ = placed[name]
        scan = CASES[name][2]
        lo_s = jax.device_put(_stack_layers(ref_lora) if scan else ref_lora, plan.lora_params)
        merge = S.make_sharded_merge(LORA, plan.base)
        compiled = merge.lower(b_s, lo_s).compile()
        merged = compiled(b_s, lo_s)
        diff, peak = _max_rel(_unstack_layers(jax.device_get(merged)) if scan else merged, expected)
        comms = S.collectives(compiled)
        same = all(m.sharding.is_equivalent_to(s, m.ndim) for m, s in zip(jax.tree.leaves(merged),
                                                                            jax.tree.leaves(plan.base)))
        result["merge"][name] = {"max_abs_diff": diff, "max_abs": peak, "shardings_kept": same,
                                 "collectives": {"counts": comms.counts(), "bytes": comms.bytes()},
                                 "all_gather_bytes": sorted({op.bytes for op in comms.ops if op.kind == "all-gather"}),
                                 "kernel_bytes": _kernel_bytes(b_s)}

    result["merge_seconds"] = time.perf_counter() - t1
    # orbax round trip of a sharded adapter and its optimizer state
    t1 = time.perf_counter()
    plan, _, lo_s, opt_s = placed[CHECKPOINT_CASE]
    state = TrainState(lo_s, opt_s, step=STEPS)
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(state)
    like = TrainState(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), lo_s),
                      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), opt_s), 0)
    with Checkpointer(ckpt_dir) as ckpt:
        back = ckpt.restore(like)
    pairs = list(zip(jax.tree.leaves((back.lora_params, back.opt_state)), jax.tree.leaves((lo_s, opt_s))))
    result["checkpoint"] = {
        "case": CHECKPOINT_CASE, "leaves": len(pairs), "step": back.step,
        "values_equal": sum(bool(np.array_equal(jax.device_get(a), jax.device_get(b))) for a, b in pairs),
        "shardings_equal": sum(a.sharding == b.sharding for a, b in pairs),
        "restored_specs": {k: _spec(v.sharding) for k, v in _flat(back.lora_params).items()},
        "seconds": time.perf_counter() - t1}
    result["seconds"] = time.perf_counter() - t0
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if a != "--all"], extra="--all" in sys.argv)
