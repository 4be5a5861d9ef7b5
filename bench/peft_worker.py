"""The PyTorch side of ``bench.peers``: Hugging Face PEFT training steps, driven over stdin/stdout.

This script runs under a *separate* Python that has ``torch``, ``transformers``
and ``peft`` (never lora_jax's own environment: the package and its tests do
not depend on PyTorch). ``bench.peers`` starts it once and keeps it alive, so
the PyTorch steps and the JAX steps can be timed in alternating rounds of one
invocation instead of in two runs minutes apart.

Protocol: one JSON object per line in each direction.

- ``{"cmd": "setup", "model_dir": dir, "input_ids": [[...], ...], "rank": r, "alpha": a,
  "targets": [...], "lr": lr, "weight_decay": wd, "seed": s}`` loads the
  Hugging Face checkpoint that lora_jax wrote to ``dir`` (so both frameworks
  start from the same weights and see the same batch), builds a full
  fine-tune copy and a PEFT LoRA copy, and answers with parameter counts and
  versions.
- ``{"cmd": "step", "which": "full" | "lora", "n": k}`` runs ``k`` optimizer
  steps and answers ``{"times_s": [...], "losses": [...]}``.
- ``{"cmd": "quit"}`` exits.

Every step is ``loss = model(input_ids=x, labels=x).loss; loss.backward();
opt.step(); opt.zero_grad(set_to_none=True)`` with ``torch.optim.AdamW``, the
path a PEFT user follows.
"""

from __future__ import annotations

import copy
import json
import sys
import time


def _send(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Peers:
    def __init__(self, spec: dict):
        import peft
        import torch
        import transformers

        self.torch = torch
        torch.manual_seed(spec["seed"])
        base = transformers.LlamaForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32,
                                                             attn_implementation="sdpa")
        lora_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=spec["rank"], lora_alpha=spec["alpha"], target_modules=list(spec["targets"]), lora_dropout=0.0,
            bias="none", task_type="CAUSAL_LM"))
        self.models = {"full": base, "lora": lora_model}
        self.batch = torch.tensor(spec["input_ids"], dtype=torch.long)
        self.opts, self.calls = {}, {}
        for name, model in self.models.items():
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            self.opts[name] = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=spec["weight_decay"])
            self.calls[name] = model
        trainable = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
        self.info = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "torch_threads": torch.get_num_threads(), "attn_implementation": base.config._attn_implementation,
                     "base_params": sum(p.numel() for p in base.parameters()),
                     "lora_trainable_params": trainable,
                     "lora_modules": sum(1 for n, _ in lora_model.named_modules() if n.endswith("lora_A"))}

    def step(self, which: str, n: int) -> dict:
        model, opt = self.calls[which], self.opts[which]
        times, losses = [], []
        for _ in range(n):
            start = time.perf_counter()
            loss = model(input_ids=self.batch, labels=self.batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            value = float(loss.detach())  # waits for the step (CPU: already synchronous)
            times.append(time.perf_counter() - start)
            losses.append(value)
        return {"times_s": times, "losses": losses}


def main() -> int:
    peers = None
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["cmd"] == "setup":
                peers = Peers(msg)
                _send({"ok": True, **peers.info})
            elif msg["cmd"] == "step":
                _send({"ok": True, **peers.step(msg["which"], int(msg["n"]))})
            elif msg["cmd"] == "quit":
                _send({"ok": True})
                return 0
            else:
                _send({"ok": False, "error": f"unknown command {msg['cmd']!r}"})
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which raises
            _send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
