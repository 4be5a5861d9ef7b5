"""bench.op_profile: a real profile of a small jitted matmul, and the HLO text parser on a literal snippet."""

import jax
import jax.numpy as jnp

from bench import op_profile as profile

HLO = """HloModule jit_f, is_scheduled=true

%fused_computation.3 (param_0: f32[8,16]) -> f32[8,16] {
  %param_0 = f32[8,16]{1,0} parameter(0)
  ROOT %mul.1 = f32[8,16]{1,0} multiply(%param_0, %param_0), metadata={op_name="jit(f)/mul"}
}

%fused_computation.4 (param_0.1: f32[8,16]) -> f32[16,8] {
  %param_0.1 = f32[8,16]{1,0} parameter(0)
  ROOT transpose.2 = f32[16,8]{0,1} transpose(param_0.1), dimensions={1,0}, metadata={op_name="jit(f)/jvp(g)/transpose"}
}

ENTRY %main.9 (x.1: f32[8,16], w.1: f32[16,32]) -> (f32[8,32], f32[16,8]) {
  %x.1 = f32[8,16]{1,0} parameter(0), metadata={op_name="x"}
  %w.1 = f32[16,32]{1,0} parameter(1), metadata={op_name="w"}
  %fusion.3 = f32[8,16]{1,0} fusion(%x.1), kind=kLoop, calls=%fused_computation.3, metadata={op_name="jit(f)/mul"}
  %custom-call.2 = (f32[8,32]{1,0}, s8[1024]{0}) custom-call(%fusion.3, %w.1), custom_call_target="__cublas$gemm", metadata={op_name="jit(f)/dot_general" source_file="f.py"}, backend_config={"gemm_backend_config":{"alpha_real":1}}
  fusion.4 = f32[16,8]{0,1} fusion(x.1), kind=kLoop, calls=fused_computation.4
  %gte = f32[8,32]{1,0} get-tuple-element(%custom-call.2), index=0
  ROOT %tuple = (f32[8,32]{1,0}, f32[16,8]{0,1}) tuple(%gte, fusion.4)
}
"""


def test_parse_hlo_maps_names_to_op_name_and_category():
    hlo = profile.parse_hlo(HLO)
    assert hlo["fusion.3"]["opcode"] == "fusion"
    assert hlo["fusion.3"]["kind"] == "kLoop"
    assert hlo["fusion.3"]["calls"] == "fused_computation.3"
    assert hlo["fusion.3"]["op_name"] == "jit(f)/mul"
    assert hlo["fusion.3"]["category"] == "fusion (loop)"
    assert hlo["custom-call.2"]["opcode"] == "custom-call"
    assert hlo["custom-call.2"]["target"] == "__cublas$gemm"
    assert hlo["custom-call.2"]["category"] == "matmul (cuBLAS)"
    assert hlo["custom-call.2"]["op_name"] == "jit(f)/dot_general"
    # no '%', no metadata on the fusion: op_name comes from the fused computation's root
    assert hlo["fusion.4"]["op_name"] == "jit(f)/jvp(g)/transpose"
    assert hlo["fusion.4"]["category"] == "copy/transpose"
    assert hlo["tuple"]["opcode"] == "tuple"
    assert "main.9" not in hlo and "fused_computation.3" not in hlo
    assert profile.shorten(hlo["fusion.4"]["op_name"]) == "jvp(g)/transpose"
    assert len(profile.shorten("jit(f)/" + "a/" * 100, width=80)) == 80


def test_kernel_category_without_hlo():
    assert profile.kernel_category("sm90_xmma_gemm_f16f16_f32") == "matmul"
    assert profile.kernel_category("cudnn_generated_fmha_fwd") == "attention"
    assert profile.kernel_category("loop_add_fusion") == "fusion"


def test_top_ops_on_a_small_matmul(tmp_path):
    @jax.jit
    def f(x, w):
        return jnp.tanh(x @ w) * 2.0

    x, w = jnp.ones((64, 128)), jnp.ones((128, 64))
    result = profile.top_ops(f, x, w, steps=2, trace_dir=str(tmp_path))
    assert result["total_ms_per_step"] > 0
    assert result["ops"], result.get("note")
    shares = [op["share"] for op in result["ops"]]
    assert all(0.0 <= s <= 1.0 for s in shares)
    assert sum(shares) <= 1.0 + 1e-6
    assert all(op["calls_per_step"] > 0 and op["kernel"] for op in result["ops"])
    assert any(op["source"] for op in result["ops"])   # names matched the compiled text
    table = profile.rows(result, limit=3)
    assert len(table) <= 3 and all(len(r) == len(profile.COLUMNS) for r in table)


def test_top_ops_accepts_a_compiled_function():
    compiled = jax.jit(lambda x: (x @ x.T).sum()).lower(jnp.ones((32, 32))).compile()
    result = profile.top_ops(compiled, jnp.ones((32, 32)), steps=1, limit=1)
    assert len(result["ops"]) <= 1 and result["other_ms_per_step"] >= 0
