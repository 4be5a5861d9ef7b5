"""Batched generation with the KV cache: lora_jax's jitted ``generate`` against transformers' ``generate``.

The same random Llama (lora_jax writes it as a Hugging Face folder, transformers reads it), the same
8 prompts of mixed lengths padded on the left with an attention mask, 128 new tokens each, greedy,
KV cache on both sides, on the same machine and back to back. lora_jax's whole loop is one compiled
function: its first call (tracing and compilation included) is reported apart from the timed calls.
transformers runs in a subprocess (``bench/generation_worker.py``) under the Python of
``bench.peers.torch_python()`` (``LORA_JAX_BENCH_TORCH_PYTHON`` or ``bench/.peers-venv``); without
one its row is skipped. Tokens/s counts new tokens only (batch x new tokens per call).

``python -m bench --only generation`` on CPU; ``bench/gpu.py`` calls :func:`measure` at its own size.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench import common, peers
from lora_jax.models import LlamaConfig, LlamaForCausalLM, generate, save_pretrained

NAME = "generation"
TITLE = "Batched generation with the KV cache (8 mixed-length prompts, 128 new tokens) vs transformers"
WORKER = Path(__file__).resolve().parent / "generation_worker.py"
MODEL = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4)
LENGTHS = (5, 12, 20, 31, 40, 48, 57, 64)     # the prompts' real lengths, left-padded to the longest
NEW_TOKENS = 128
PAD = 0
SETTINGS = {"smoke": (0, 1), "quick": (1, 3), "full": (2, 7)}     # mode -> (warm-up calls, timed calls)


def prompts(lengths, vocab: int, seed: int = 0):
    """Left-padded ``input_ids`` and ``attention_mask`` ``[len(lengths), max(lengths)]`` (real ids in 1..vocab-1)."""
    width = max(lengths)
    ids = np.random.default_rng(seed).integers(1, vocab, (len(lengths), width))
    mask = (np.arange(width)[None, :] >= width - np.asarray(lengths)[:, None]).astype(np.int32)
    return np.where(mask == 1, ids, PAD).astype(np.int32), mask


def _ours(module, params, ids, mask, new_tokens: int, warmup: int, repeats: int) -> dict:
    run = lambda: generate(module, params, ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=PAD)
    out, first_s = common.timed(run)
    for _ in range(warmup):
        common.timed(run)
    times = [common.timed(run)[1] for _ in range(repeats)]
    return {"first_call_s": first_s, "times_s": times, "tokens": np.asarray(out)}


def _theirs(python: str | None, folder: str, ids, mask, new_tokens, dtype, warmup, repeats, timeout_s) -> dict:
    if python is None:
        return {"skipped": f"no PyTorch environment (bash bench/setup_peers.sh or {peers.ENV_VAR})"}
    request = {"model_dir": folder, "input_ids": ids.tolist(), "attention_mask": mask.tolist(),
               "new_tokens": new_tokens, "pad_token_id": PAD, "dtype": dtype, "warmup": warmup, "repeats": repeats}
    try:
        done = subprocess.run([python, str(WORKER)], input=json.dumps(request), capture_output=True, text=True,
                              timeout=timeout_s, check=True)
    except (subprocess.SubprocessError, OSError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    answer = json.loads(done.stdout)
    answer["tokens"] = np.asarray(answer["tokens"], np.int32)
    return answer


def _agreement(ours: np.ndarray, theirs: np.ndarray, prompt: int) -> dict:
    """How far each row's greedy tokens agree (random weights: near-ties may part the two later on)."""
    same = ours[:, prompt:] == theirs[:, prompt:]
    leading = [int(np.argmin(row)) if not row.all() else row.size for row in same]
    return {"equal_tokens": int(same.sum()), "tokens": int(same.size), "rows_identical": int(same.all(axis=1).sum()),
            "leading_equal_per_row": leading}


def measure(model_kw: dict, *, lengths=LENGTHS, new_tokens: int = NEW_TOKENS, dtype: str = "float32",
            warmup: int = 1, repeats: int = 3, torch_python: str | None = None, timeout_s: float = 600.0,
            seed: int = 0) -> dict:
    """Both frameworks' batched greedy generation on one random Llama: times, tokens/s, ratio, agreement."""
    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    module = LlamaForCausalLM(LlamaConfig(**model_kw, dtype=jdtype, param_dtype=jdtype))
    ids, mask = prompts(lengths, model_kw["vocab_size"], seed)
    params = jax.jit(module.init)(jax.random.key(seed), jnp.asarray(ids))["params"]
    ours = _ours(module, params, ids, mask, new_tokens, warmup, repeats)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(folder, module, params)
        theirs = _theirs(torch_python, folder, ids, mask, new_tokens, dtype, warmup, repeats, timeout_s)
    tokens = len(lengths) * new_tokens
    result = {"config": {"model": model_kw, "dtype": dtype, "prompt_lengths": list(lengths), "new_tokens": new_tokens,
                         "warmup": warmup, "repeats": repeats},
              "lora_jax": {**common.stats(ours["times_s"]), "times_s": ours["times_s"],
                           "first_call_s": ours["first_call_s"],
                           "compile_s": ours["first_call_s"] - statistics.median(ours["times_s"]),
                           "tokens_per_s": tokens / statistics.median(ours["times_s"])},
              "transformers": {k: v for k, v in theirs.items() if k != "tokens"}}
    if "times_s" in theirs:
        result["transformers"].update(common.stats(theirs["times_s"]),
                                      tokens_per_s=tokens / statistics.median(theirs["times_s"]))
        result["ratio_tokens_per_s"] = result["lora_jax"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
        result["agreement"] = _agreement(ours["tokens"], theirs["tokens"], ids.shape[1])
    return result


def table(result: dict, label: str = "") -> dict:
    """The markdown table of one :func:`measure` result."""
    ours, theirs = result["lora_jax"], result["transformers"]
    ratio = result.get("ratio_tokens_per_s")
    rows = [["lora_jax generate (jit, while_loop)", f"{ours['compile_s']:.2f}", f"{ours['median_s']:.3f}",
             f"{ours['min_s']:.3f}", f"{ours['tokens_per_s']:.0f}", "n/a" if ratio is None else f"{ratio:.2f}"]]
    if "tokens_per_s" in theirs:
        rows.append([f"transformers generate ({theirs['device']}, {theirs['threads']} threads)", "-",
                     f"{theirs['median_s']:.3f}", f"{theirs['min_s']:.3f}", f"{theirs['tokens_per_s']:.0f}", "1.00"])
    else:
        rows.append(["transformers generate", "-", "-", "-", "-", theirs.get("skipped") or theirs.get("error")])
    return {"title": f"Batched greedy generation{label}", "rows": rows,
            "columns": ["implementation", "compile s", "median s", "min s", "new tokens/s", "ratio vs transformers"]}


def notes(result: dict) -> list[str]:
    cfg, theirs = result["config"], result["transformers"]
    out = [f"Generation model: LlamaForCausalLM({', '.join(f'{k}={v}' for k, v in cfg['model'].items())}), {cfg['dtype']}, "
           f"random weights; prompts of {cfg['prompt_lengths']} tokens left-padded with an attention mask; "
           f"{cfg['new_tokens']} new tokens each, greedy, KV cache; {cfg['warmup']} warm-up and {cfg['repeats']} "
           "timed calls each. lora_jax's compile time is its first call minus the median call."]
    if "versions" in theirs:
        out.append("transformers side: " + ", ".join(f"{k} {v}" for k, v in theirs["versions"].items())
                   + f", `model.generate(ids, attention_mask=mask, do_sample=False)`, "
                     f"{theirs['attn_implementation']} attention, DynamicCache.")
    if "agreement" in result:
        a = result["agreement"]
        out.append(f"Tokens: {a['equal_tokens']} of {a['tokens']} equal, {a['rows_identical']} of "
                   f"{len(cfg['prompt_lengths'])} rows identical (random weights: near-tied logits may part "
                   f"the two later in a row; leading equal tokens per row {a['leading_equal_per_row']}).")
    return out


def run(mode: str = "quick") -> dict:
    warmup, repeats = SETTINGS[mode]
    started = time.perf_counter()
    result = measure(MODEL, warmup=warmup, repeats=repeats, torch_python=peers.torch_python())
    common.log(f"[{NAME}] measured in {time.perf_counter() - started:.1f}s")
    return {"title": TITLE, "mode": mode, "method": (
        "lora_jax: `generate(..., attention_mask=mask)` timed with `jax.block_until_ready`; transformers: "
        "`model.generate` timed in its own process. Both use this machine's cores, never at the same time."),
        **result, "tables": [table(result)], "notes": notes(result)}


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "quick"), indent=2, default=str))
