"""Sharded LoRA: spec derivation and its errors in-process; training, merge and checkpoints on 8 fake devices.

The fake devices exist only if ``XLA_FLAGS`` is set before JAX starts, so the
sharded computations run in one subprocess (``tests/_sharding_worker.py``)
whose JSON the tests below read. Under pytest-xdist the workers share one run
of it (a file lock in the session's temporary directory).
"""

import fcntl
import functools
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

import lora_jax as L
from lora_jax import sharding as S
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM
from tests import _sharding_worker as worker
from tests.tolerances import tol

WORKER = pathlib.Path(__file__).with_name("_sharding_worker.py")
ROOT = WORKER.parents[1]
F32 = tol(jnp.float32)
CASES, MERGE_CASES = list(worker.CASES), list(worker.MERGE_CASES)


# ---- in process: spec derivation on abstract meshes (no devices needed)

SMALL = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
LORA = L.LoraConfig(rank=2, targets=("attention", "mlp", "embedding", "lm_head"))


@functools.lru_cache(maxsize=None)
def _llama(scan=False):
    model = LlamaForCausalLM(LlamaConfig(**{**SMALL.__dict__, "scan_layers": scan}))
    ids = jnp.zeros((2, 4), jnp.int32)
    base = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    lora = jax.eval_shape(lambda: L.init_lora(model, base, LORA, ids, rng=jax.random.key(1)))
    return base, lora


def _specs(tree):
    return {jax.tree_util.keystr(kp, simple=True, separator="/"): tuple(s.spec)
            for kp, s in jax.tree_util.tree_flatten_with_path(tree)[0]}


MESH_4x2 = AbstractMesh((4, 2), ("data", "model"))

# What the issue specifies for each adapter under fsdp_tp: A takes the kernel's input-dim spec, B its
# output-dim spec, the rank axis is replicated, a stacked layer axis stays unsharded.
FSDP_TP_LORA = {
    "model/layers_0/self_attn/q_proj/a": ("data", None), "model/layers_0/self_attn/q_proj/b": (None, "model"),
    "model/layers_0/mlp/up_proj/a": ("data", None), "model/layers_0/mlp/up_proj/b": (None, "model"),
    "model/layers_1/self_attn/o_proj/a": ("model", None), "model/layers_1/self_attn/o_proj/b": (None, "data"),
    "model/layers_1/mlp/down_proj/a": ("model", None), "model/layers_1/mlp/down_proj/b": (None, "data"),
    "model/embed_tokens/a": ("model", None), "model/embed_tokens/b": (None, "data"),
    "lm_head/a": ("data", None), "lm_head/b": (None, "model"),
}


def _stacked(expected):
    out = {}
    for path, spec in expected.items():
        if "/layers_" in path:
            out[path.replace("layers_0", "layers").replace("layers_1", "layers")] = (None,) + spec
        else:
            out[path] = spec
    return out


def test_fsdp_tp_base_rules_on_llama():
    base, _ = _llama()
    specs = _specs(S.base_shardings(base, MESH_4x2, "fsdp_tp"))
    assert specs["model/layers_0/self_attn/q_proj/kernel"] == ("data", "model")     # column-parallel
    assert specs["model/layers_1/mlp/down_proj/kernel"] == ("model", "data")        # row-parallel
    assert specs["model/embed_tokens/embedding"] == ("model", "data")               # vocabulary-parallel
    assert specs["lm_head/kernel"] == ("data", "model")
    assert specs["model/norm/weight"] == (None,)                                    # the catch-all
    scanned, _ = _llama(scan=True)
    specs = _specs(S.base_shardings(scanned, MESH_4x2, "fsdp_tp"))
    assert specs["model/layers/self_attn/q_proj/kernel"] == (None, "data", "model")  # layer axis unsharded
    assert specs["model/layers/input_layernorm/weight"] == (None, None)


@pytest.mark.parametrize("scan", [False, True])
def test_lora_shardings_follow_the_base_layer(scan):
    base, lora = _llama(scan)
    specs = _specs(S.lora_shardings(base, lora, S.base_shardings(base, MESH_4x2, "fsdp_tp")))
    expected = _stacked(FSDP_TP_LORA) if scan else FSDP_TP_LORA
    assert {k: specs[k] for k in expected} == expected
    assert len(specs) == 2 * (7 * (1 if scan else 2) + 2)


@pytest.mark.parametrize("strategy, q_a, q_b, o_a, o_b", [
    ("dp", (None, None), (None, None), (None, None), (None, None)),
    ("fsdp", ("data", None), (None, None), ("data", None), (None, None)),
    ("tp", (None, None), (None, "model"), ("model", None), (None, None)),
])
def test_lora_shardings_per_strategy(strategy, q_a, q_b, o_a, o_b):
    base, lora = _llama()
    specs = _specs(S.lora_shardings(base, lora, S.base_shardings(base, MESH_4x2, strategy)))
    attn = "model/layers_0/self_attn/"
    assert (specs[attn + "q_proj/a"], specs[attn + "q_proj/b"]) == (q_a, q_b)
    assert (specs[attn + "o_proj/a"], specs[attn + "o_proj/b"]) == (o_a, o_b)


def test_multi_axis_kernels_map_each_dim():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):                                    # x: [batch, 8, 8, 4]
            h = nn.Conv(8, (3, 3), name="conv")(x)                 # kernel [3, 3, 4, 8]
            h = nn.DenseGeneral((2, 4), name="heads")(h)           # kernel [8, 2, 4]
            return nn.DenseGeneral(8, axis=(-2, -1), name="out")(h)  # kernel [2, 4, 8]

    x = jnp.zeros((1, 8, 8, 4))
    base = jax.eval_shape(Net().init, jax.random.key(0), x)["params"]
    lora = jax.eval_shape(lambda: L.init_lora(Net(), base, L.LoraConfig(rank=2, targets="re:conv|heads|out"), x,
                                              rng=jax.random.key(1)))
    rules = [(r"conv/kernel", P(None, None, "data", "model")), (r"heads/kernel", P("data", "model", None)),
             (r"out/kernel", P("model", None, "data")), (".*", P())]
    specs = _specs(S.lora_shardings(base, lora, S.base_shardings(base, MESH_4x2, rules)))
    assert specs == {"conv/a": (None, None, "data", None), "conv/b": (None, "model"),
                     "heads/a": ("data", None), "heads/b": (None, "model", None),
                     "out/a": ("model", None, None), "out/b": (None, "data")}


def test_partition_specs_in_partition_specs_out():
    base, lora = _llama()
    sh = S.lora_shardings(base, lora, jax.tree.map(lambda s: s.spec, S.base_shardings(base, MESH_4x2, "tp")))
    assert sh["model"]["layers_0"]["mlp"]["gate_proj"]["b"] == P(None, "model")
    # a sharding of an array follows JAX's convention: a short spec leaves the trailing dims unsharded
    base = {"q": {"kernel": jnp.zeros((8, 6))}}
    lora = {"q": {"a": jnp.zeros((8, 2)), "b": jnp.zeros((2, 6))}}
    short = S.lora_shardings(base, lora, {"q": {"kernel": NamedSharding(MESH_4x2, P("data"))}})
    assert (tuple(short["q"]["a"].spec), tuple(short["q"]["b"].spec)) == (("data", None), (None, None))


def test_lora_shardings_in_the_old_argument_order_warns_and_agrees():
    base, lora = _llama()
    sh = S.base_shardings(base, MESH_4x2, "fsdp_tp")
    with pytest.warns(DeprecationWarning, match=r"lora_shardings\(lora_params, base_params, \.\.\.\) is deprecated"):
        old = S.lora_shardings(lora, base, sh)
    assert old == S.lora_shardings(base, lora, sh)


def test_opt_state_follows_the_adapters():
    base, lora = _llama()
    lora_sh = S.lora_shardings(base, lora, S.base_shardings(base, MESH_4x2, "fsdp_tp"))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state = S.opt_state_shardings(tx, lora, lora_sh)
    adam = state[1][0]
    assert adam.mu == lora_sh and adam.nu == lora_sh
    assert adam.count == NamedSharding(MESH_4x2, P())
    weird = optax.GradientTransformation(lambda p: {"table": jnp.zeros(3)}, None)
    with pytest.raises(ValueError, match=r"optimizer state leaf 'table' of shape \[3\] follows no adapter"):
        S.opt_state_shardings(weird, lora, lora_sh)


def test_rule_naming_a_missing_mesh_axis_is_an_error():
    base, _ = _llama()
    with pytest.raises(ValueError, match=r"names mesh axes \['model'\], but the mesh has \('data',\)"):
        S.base_shardings(base, AbstractMesh((8,), ("data",)), "tp")


def test_indivisible_dim_names_the_path_shape_and_spec():
    base, _ = _llama()   # vocab 64 does not divide by 3 (the head comes first in tree order)
    with pytest.raises(ValueError, match=r"param 'lm_head/kernel': shape \[32, 64\] does not divide over spec "
                                         r"(P|PartitionSpec)\('data', 'model'\): dim 64 is not divisible by 3"):
        S.base_shardings(base, AbstractMesh((1, 3), ("data", "model")), "fsdp_tp")


def test_unmatched_param_and_unknown_strategy():
    base = {"blk": {"kernel": jnp.zeros((4, 4))}}
    with pytest.raises(ValueError, match=r"param 'blk/kernel' matches no sharding rule"):
        S.base_shardings(base, MESH_4x2, [(r"other", P())])
    with pytest.raises(ValueError, match=r"unknown sharding strategy 'zero3'"):
        S.rules("zero3")
    with pytest.raises(ValueError, match=r"spec (P|PartitionSpec)\(None, 'data', None\) has 3 entries but the leaf "
                                         r"has shape \[4, 4\]"):
        S.base_shardings(base, MESH_4x2, [(r".*", P(None, "data", None))])


def test_explicit_mesh_axes_are_refused():
    mesh = AbstractMesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    with pytest.raises(ValueError, match=r"mesh axes \['data', 'model'\] are Explicit"):
        S.base_shardings({"q": {"kernel": jnp.zeros((4, 4))}}, mesh, "dp")


def test_lora_tree_not_matching_the_base_is_an_error():
    base = {"q": {"kernel": jnp.zeros((8, 6))}}
    sh = {"q": {"kernel": P("data", None)}}
    with pytest.raises(ValueError, match=r"adapter 'k' has no layer in base params"):
        S.lora_shardings(base, {"k": {"a": jnp.zeros((8, 2)), "b": jnp.zeros((2, 6))}}, sh)
    with pytest.raises(ValueError, match=r"layer 'q': adapter shapes a\[6, 2\], b\[2, 8\] do not fit a weight of "
                                         r"shape \[8, 6\]"):
        S.lora_shardings(base, {"q": {"a": jnp.zeros((6, 2)), "b": jnp.zeros((2, 8))}}, sh)
    with pytest.raises(ValueError, match=r"leaves outside adapter nodes .*: q/extra"):
        S.lora_shardings(base, {"q": {"a": jnp.zeros((8, 2)), "b": jnp.zeros((2, 6)), "extra": jnp.zeros(6)}}, sh)
    # a DoRA magnitude runs along the output features: it takes the weight's output-axis sharding
    dora = S.lora_shardings(base, {"q": {"a": jnp.zeros((8, 2)), "b": jnp.zeros((2, 6)), "m": jnp.zeros(6)}},
                            {"q": {"kernel": P("data", "model")}})
    assert tuple(dora["q"]["m"]) == ("model",) and tuple(dora["q"]["b"]) == (None, "model")
    with pytest.raises(ValueError, match=r"layer 'q': its kernel has sharding None"):
        S.lora_shardings(jax.eval_shape(lambda: base), {"q": {"a": jnp.zeros((8, 2)), "b": jnp.zeros((2, 6))}})


HLO = """HloModule step
%body (p: (s32[], f32[64,8])) -> (s32[], f32[64,8]) {
  %ag = f32[64,8]{1,0} all-gather(f32[16,8]{1,0} %x), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
  %ar-start = f32[4]{0} all-reduce-start(f32[4]{0} %y), channel_id=2, to_apply=%add
  %ar-done = f32[4]{0} all-reduce-done(f32[4]{0} %ar-start)
}
ENTRY %main.1 (a: f32[8,8]) -> (f32[8,8], bf16[2,2]) {
  %w = (s32[], f32[64,8]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %rs = (f32[2,8]{1,0}, bf16[2,2]{1,0}) reduce-scatter(f32[8,8]{1,0} %a, bf16[8,2]{1,0} %b), dimensions={0}
  ROOT %cp = f32[8,8]{1,0} collective-permute(f32[8,8]{1,0} %a), source_target_pairs={{0,1}}
}
"""


def test_collectives_counts_ops_bytes_and_loop_trips():
    c = S.collectives(HLO)
    assert c.counts(executed=False) == {"all-gather": 1, "reduce-scatter": 1, "all-reduce": 1,
                                        "collective-permute": 1}
    assert c.counts() == {"all-gather": 3, "reduce-scatter": 1, "all-reduce": 3, "collective-permute": 1}
    assert c.bytes() == {"all-gather": 3 * 64 * 8 * 4, "reduce-scatter": 2 * 8 * 4 + 2 * 2 * 2,
                         "all-reduce": 3 * 16, "collective-permute": 8 * 8 * 4}


# ---- on 8 fake devices, in one subprocess

@pytest.fixture(scope="module")
def results(tmp_path_factory):
    # xdist workers of one session share the parent of their base temp dirs and the run uid
    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    root = tmp_path_factory.getbasetemp().parent if uid else tmp_path_factory.getbasetemp()
    out = root / f"sharding_worker_{uid or 'local'}.json"
    with open(root / f"sharding_worker_{uid or 'local'}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            # Unoptimised CPU code generation halves XLA's compile time here, the run's main cost;
            # the single-device reference runs under the same flags.
            env = {**os.environ, "JAX_PLATFORMS": "cpu",
                   "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"}
            tmp = out.with_suffix(".partial")
            proc = subprocess.run([sys.executable, str(WORKER), str(tmp), str(root / f"ckpt_{uid or 'local'}")],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr[-4000:]
            tmp.rename(out)
    return json.loads(out.read_text())


def test_worker_ran_every_case(results):
    assert sorted(results["cases"]) == sorted(CASES)
    assert {tuple(c["mesh"]) for c in results["cases"].values()} == {(8, 1), (4, 2), (2, 4)}


@pytest.mark.parametrize("case", CASES)
def test_sharded_step_matches_one_device(results, case):
    r = results["cases"][case]
    ref_loss, ref_norm = np.array(results["reference_losses"]), np.array(results["reference_grad_norms"])
    assert len(ref_loss) == results["steps"] >= 3
    assert np.max(np.abs(np.array(r["losses"]) - ref_loss)) <= F32 * np.max(ref_loss)
    assert np.max(np.abs(np.array(r["grad_norms"]) - ref_norm)) <= F32 * np.max(ref_norm)
    # the adapters after the steps, and (sharper) what the steps changed in them
    assert r["lora_max_abs_diff"] <= F32 * r["lora_max_abs"]
    assert r["update_max_abs"] > 1e-3
    assert r["update_max_abs_diff"] <= F32 * r["update_max_abs"]


@pytest.mark.parametrize("case", CASES)
def test_trained_adapters_keep_the_specified_shardings(results, case):
    r = results["cases"][case]
    specs = {k: tuple(v) for k, v in r["lora_specs"].items()}
    # the step's outputs (and the optimizer state) stay where the plan put them
    assert r["lora_actual_specs"] == r["lora_specs"]
    assert r["opt_state_actual_specs"] == r["opt_state_specs"]
    for path, spec in r["lora_specs"].items():
        # SGD's momentum trace follows its adapter leaf
        assert r["opt_state_specs"][f"1/0/trace/{path}"] == spec
    base = {k: tuple(v) for k, v in r["base_specs"].items()}
    expected = {"fsdp": {"model/layers_0/self_attn/q_proj/a": ("data", None),
                         "model/layers_0/self_attn/q_proj/b": (None, None),
                         "model/layers_0/mlp/down_proj/a": ("data", None),
                         "model/embed_tokens/a": ("data", None), "lm_head/a": ("data", None)},
                "fsdp_tp": FSDP_TP_LORA,
                "tp": {"model/layers_0/self_attn/q_proj/a": (None, None),
                       "model/layers_0/self_attn/q_proj/b": (None, "model"),
                       "model/layers_1/mlp/down_proj/a": ("model", None),
                       "model/layers_1/mlp/down_proj/b": (None, None),
                       "model/embed_tokens/a": ("model", None), "lm_head/b": (None, "model")}}[r["strategy"]]
    expected = _stacked(expected) if r["scan"] else expected
    assert {k: specs[k] for k in expected} == expected
    # every adapter: A = the kernel's lead and input specs + replicated rank; B = lead + rank + output
    for path, spec in specs.items():
        layer, factor = path.rsplit("/", 1)
        w = base.get(f"{layer}/kernel", base.get(f"{layer}/embedding"))
        lead = 1 if r["scan"] and "/layers/" in path else 0
        assert spec == (w[:lead + 1] + (None,) if factor == "a" else w[:lead] + (None,) + w[lead + 1:]), path


def test_collectives_per_strategy(results):
    comm = {name: results["cases"][name]["collectives"] for name in CASES}
    kernels = results["cases"]["2x4 tp"]["kernel_bytes"]
    # FSDP gathers the weights (whole kernels among them) where they are used; the adapters'
    # gradients are reduced over the batch shards
    assert comm["8x1 fsdp"]["counts"]["all-gather"] > 0 and comm["8x1 fsdp"]["counts"]["all-reduce"] > 0
    assert set(comm["8x1 fsdp"]["all_gather_bytes"]) & set(results["cases"]["8x1 fsdp"]["kernel_bytes"])
    assert comm["4x2 fsdp_tp"]["counts"]["all-gather"] > 0 and comm["4x2 fsdp_tp"]["counts"]["all-reduce"] > 0
    # pure TP: partial sums are all-reduced; no frozen kernel is gathered whole
    assert comm["2x4 tp"]["counts"]["all-reduce"] > 0
    assert not [b for b in comm["2x4 tp"]["all_gather_bytes"] if b >= min(kernels)]
    # the scanned layers' collectives sit in the loop body: executed once per layer
    scan = comm["2x4 fsdp_tp scan"]
    assert sum(scan["counts"].values()) > sum(scan["static_counts"].values())


@pytest.mark.parametrize("case", MERGE_CASES)
def test_sharded_merge_equals_unsharded_merge_without_gathering(results, case):
    m = results["merge"][case]
    assert m["max_abs_diff"] <= F32 * m["max_abs"]
    assert m["shardings_kept"]
    assert not [b for b in m["all_gather_bytes"] if b >= min(m["kernel_bytes"])]
    assert "all-gather" not in m["collectives"]["counts"]


def test_orbax_round_trip_of_a_sharded_adapter(results):
    c = results["checkpoint"]
    assert c["step"] == results["steps"]
    assert c["values_equal"] == c["shardings_equal"] == c["leaves"] > 0
    assert c["restored_specs"] == results["cases"][c["case"]]["lora_specs"]
    assert tuple(c["restored_specs"]["model/layers/self_attn/q_proj/a"]) == (None, "data", None)
