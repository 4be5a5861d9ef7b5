"""A Hugging Face checkpoint and a PEFT adapter, in JAX and back, with the numbers that show it works.

  1. read a Llama folder written by transformers (safetensors) and a PEFT LoRA adapter;
  2. generate with the adapter applied unmerged (KV cache, greedy);
  3. train the adapter further on a few lines of text (bytes as tokens: the tiny model's
     vocabulary is 128, plain ASCII);
  4. write it back in PEFT's format, read it again, and write a merged Hugging Face folder;
     print the file sizes: the adapter beside the base.

Run from the repository root:  python examples/hf_peft.py [--model DIR] [--adapter DIR] [--steps 30]
The defaults are the tiny fixtures transformers/PEFT wrote for the tests.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as L
from lora_jax.io import load_peft, save_peft
from lora_jax.models import causal_lm_loss, from_pretrained, generate, save_pretrained

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")
TEXT = ("LoRA keeps the base weights frozen and trains two small matrices beside each layer. "
        "The adapter is a few kilobytes; the base model forgets nothing. ")


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def text_batches(text: str, seq: int, batch: int, rng: np.random.Generator) -> jnp.ndarray:
    data = np.frombuffer((text * 8).encode("ascii"), np.uint8).astype(np.int32)
    starts = rng.integers(0, len(data) - seq, size=batch)
    return jnp.asarray(np.stack([data[s:s + seq] for s in starts]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.join(FIXTURES, "llama_tiny"), help="Hugging Face Llama folder")
    parser.add_argument("--adapter", default=os.path.join(FIXTURES, "adapters", "plain"), help="PEFT adapter folder")
    parser.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model, base = from_pretrained(args.model)
    adapter = load_peft(args.adapter)
    cfg, lora = adapter.config, adapter.lora_params
    print(f"model: {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, "
          f"vocab {model.config.vocab_size}; adapter: rank {cfg.rank}, alpha {cfg.alpha}, targets {cfg.targets}")
    L.summary(base, lora, cfg, print_fn=lambda s: print(s.splitlines()[-1]))

    prompt = jnp.asarray([list(b"LoRA ")], jnp.int32)
    adapted = L.lora_apply(model, cfg)
    tokens = generate(model, (base, lora), prompt, max_new_tokens=12,
                      apply=lambda p, ids, cache: adapted(p[0], p[1], ids, cache=cache))
    print("generated (adapter on, greedy):", np.asarray(tokens)[0].tolist())

    rng = np.random.default_rng(args.seed)
    eval_ids = text_batches(TEXT, 32, 8, rng)
    apply = L.lora_apply(model, cfg)
    tx = optax.adamw(2e-2)
    step = L.make_train_step(apply, lambda m, ids: causal_lm_loss(m(ids), ids), tx)
    before = float(causal_lm_loss(apply(base, lora, eval_ids), eval_ids))
    opt_state = tx.init(lora)
    for _ in range(args.steps):
        lora, opt_state, metrics = step(lora, opt_state, base, text_batches(TEXT, 32, 8, rng))
    after = float(causal_lm_loss(apply(base, lora, eval_ids), eval_ids))
    print(f"loss on the text: before {before:.3f} -> after {after:.3f} ({args.steps} steps)")

    with tempfile.TemporaryDirectory() as out:
        adapter_dir, merged_dir = os.path.join(out, "adapter"), os.path.join(out, "merged")
        save_peft(adapter_dir, base, lora, cfg, task_type="CAUSAL_LM", base_model_name_or_path=args.model)
        back = load_peft(adapter_dir)
        same = all(jax.tree.leaves(jax.tree.map(np.array_equal, back.lora_params, jax.tree.map(np.asarray, lora))))
        print(f"PEFT folder written and read back: tensors bitwise equal {same}")
        merged = L.merge(base, lora, cfg)
        save_pretrained(merged_dir, model, merged)
        _, reread = from_pretrained(merged_dir, show_progress=False)
        diff = float(jnp.max(jnp.abs(model.apply({"params": reread}, eval_ids) - apply(base, lora, eval_ids))))
        print(f"merged folder re-read: max |logit diff| vs unmerged {diff:.3g}")
        print(f"adapter files {folder_bytes(adapter_dir):,} bytes; base model files "
              f"{folder_bytes(args.model):,} bytes")


if __name__ == "__main__":
    main()
