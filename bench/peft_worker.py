"""The PyTorch side of ``bench.peers`` and ``bench.torch_gpu``: Hugging Face PEFT steps, driven over stdin/stdout.

This script runs under a *separate* Python that has ``torch``, ``transformers``
and ``peft`` (never lora_jax's own environment: the package and its tests do
not depend on PyTorch). The driver starts it once and keeps it alive, so the
PyTorch steps and the JAX steps can be timed in one invocation instead of in
two runs minutes apart.

Protocol: one JSON object per line in each direction; every answer carries
``"ok"`` (``true``, or ``false`` with ``"error"``: the exception's type and
text). Only answers go to stdout: anything a library prints goes to stderr.

- ``{"cmd": "setup", "model_dir": dir, "input_ids": [[...], ...], "rank": r, "alpha": a,
  "targets": [...], "lr": lr, "weight_decay": wd, "seed": s}`` (``bench.peers``,
  CPU, float32) loads the Hugging Face checkpoint that lora_jax wrote to
  ``dir`` (so both frameworks start from the same weights and see the same
  batch), builds a full fine-tune copy and a PEFT LoRA copy, and answers with
  parameter counts and versions.
- ``{"cmd": "setup_config", "config": {LlamaConfig fields, HF names}, "device": "cuda" | "cpu" | "auto",
  "dtype": "bfloat16" | "float32", "batch": B, "seq": S, "rank": r, "alpha": a, "targets": [...],
  "lr": lr, "weight_decay": wd, "seed": s, "which": ["full", "lora"]}`` (``bench.torch_gpu``) builds
  ``LlamaForCausalLM(LlamaConfig(**config))`` with random weights directly on
  the device in that dtype (sdpa attention): a full fine-tune model when
  ``"full"`` is in ``which``, and, from its own base built from the same seed
  (so never three copies at once), the PEFT LoRA model (``lora_dropout=0``,
  ``bias="none"``, ``task_type="CAUSAL_LM"``). The batch is ``[B, S]`` random
  ids drawn by ``torch.Generator`` from the seed. Each model gets AdamW over
  its trainable parameters. The answer holds versions, the device name,
  parameter counts, the attention implementation and the bytes allocated.
- ``{"cmd": "step", "which": "full" | "lora", "n": k}`` runs ``k`` optimizer
  steps and answers ``{"times_s": [...], "losses": [...], "peak_bytes": p}``.
  On CUDA each step is timed between two ``torch.cuda.synchronize()`` calls and
  ``p`` is ``torch.cuda.max_memory_allocated()`` over the ``k`` steps (the peak
  is reset first); on the CPU ``p`` is ``null``.
- ``{"cmd": "forward", "which": "base" | "lora_unmerged" | "lora_merged", "n": k}``
  times ``k`` eval-mode ``torch.no_grad()`` forwards ``model(input_ids=x).logits``;
  answers ``{"times_s", "peak_bytes", "model"}``. ``base`` is the full model,
  or the PEFT model inside ``disable_adapter()`` when there is none;
  ``lora_unmerged`` is the PEFT model; ``lora_merged`` is
  ``merge_and_unload()`` of a deep copy of it, built on first request and kept.
- ``{"cmd": "long", "batch": b, "seq": s, "n": k}`` runs ``k`` LoRA training
  steps on new random ids of shape ``[b, s]``; answers like ``step``. Out of
  device memory, it frees the cache and answers ``ok: false`` with
  ``"oom": true`` and the error; the worker stays usable.
- ``{"cmd": "free", "which": "full" | "lora" | "lora_merged"}`` drops that
  model (and its optimizer), collects garbage and empties the CUDA cache, so
  the driver can hand device memory to JAX; answers the bytes still allocated.
- ``{"cmd": "quit"}`` exits.

Every training step is ``loss = model(input_ids=x, labels=x).loss;
loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)`` with
``torch.optim.AdamW``, the path a PEFT user follows.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import sys
import time

# Run as a script, this file's folder (bench/) comes first on sys.path, where a module named like a
# standard-library one would shadow it for torch and transformers: drop the folder.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

_OUT = sys.stdout  # the protocol channel; sys.stdout is pointed at stderr in main()


def _send(obj) -> None:
    _OUT.write(json.dumps(obj) + "\n")
    _OUT.flush()


def _lora_config(peft, spec: dict):
    return peft.LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], target_modules=list(spec["targets"]),
                           lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


def _count(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class Peers:
    """The models, optimizers and batch of one setup, and the timed operations on them."""

    def __init__(self, spec: dict):
        import peft
        import torch
        import transformers

        self.torch, self.peft, self.transformers = torch, peft, transformers
        self.models: dict = {}
        self.opts: dict = {}
        self.merged = None
        if spec["cmd"] == "setup":
            self._from_checkpoint(spec)
        else:
            self._from_config(spec)
        for name, model in self.models.items():
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            self.opts[name] = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=spec["weight_decay"])
        lora_model = self.models["lora"]
        self.info = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "torch_threads": torch.get_num_threads(),
                     "attn_implementation": lora_model.get_base_model().config._attn_implementation,
                     "base_params": _count(lora_model.get_base_model()) - _count(lora_model, trainable_only=True),
                     "lora_trainable_params": _count(lora_model, trainable_only=True),
                     "lora_modules": sum(1 for n, _ in lora_model.named_modules() if n.endswith("lora_A"))}
        if spec["cmd"] == "setup_config":
            self.info.update(self._device_info())

    # ---- setup

    def _from_checkpoint(self, spec: dict) -> None:
        torch = self.torch
        self.seed = int(spec["seed"])
        torch.manual_seed(self.seed)
        self.device, self.cuda = torch.device("cpu"), False
        base = self.transformers.LlamaForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32,
                                                                  attn_implementation="sdpa")
        lora_model = self.peft.get_peft_model(copy.deepcopy(base), _lora_config(self.peft, spec))
        self.models = {"full": base, "lora": lora_model}
        self.batch = torch.tensor(spec["input_ids"], dtype=torch.long)
        self.vocab = base.config.vocab_size

    def _from_config(self, spec: dict) -> None:
        torch = self.torch
        device = spec.get("device", "auto")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32,
                      "float16": torch.float16}[spec.get("dtype", "bfloat16")]
        self.seed = int(spec["seed"])
        self.hf_config = self.transformers.LlamaConfig(**spec["config"])
        self.vocab = self.hf_config.vocab_size
        which = list(spec.get("which", ["full", "lora"]))
        if "lora" not in which:
            raise ValueError("setup_config needs 'lora' in which")
        if "full" in which:
            self.models["full"] = self._fresh_base()
        self.models["lora"] = self.peft.get_peft_model(self._fresh_base(), _lora_config(self.peft, spec))
        self.batch = self._random_ids(int(spec["batch"]), int(spec["seq"]), self.seed)

    def _fresh_base(self):
        """A randomly initialised Llama on the device, in the dtype; the same weights on every call."""
        torch = self.torch
        torch.manual_seed(self.seed)
        with torch.device(self.device):
            model = self.transformers.LlamaForCausalLM._from_config(self.hf_config, dtype=self.dtype,
                                                                    attn_implementation="sdpa")
        return model.to(device=self.device, dtype=self.dtype)

    def _random_ids(self, batch: int, seq: int, seed: int):
        gen = self.torch.Generator().manual_seed(seed)
        ids = self.torch.randint(0, self.vocab, (batch, seq), generator=gen, dtype=self.torch.long)
        return ids.to(self.device)

    def _device_info(self) -> dict:
        torch = self.torch
        info = {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "float32_matmul_precision": torch.get_float32_matmul_precision(),
                "config": {k: getattr(self.hf_config, k, None) for k in (
                    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")},
                "rope_parameters": getattr(self.hf_config, "rope_parameters", None),
                "adapter_dtype": str(next(p.dtype for p in self.models["lora"].parameters() if p.requires_grad)
                                     ).removeprefix("torch."),
                "batch_shape": list(self.batch.shape), "models": sorted(self.models)}
        if self.cuda:
            self._sync()
            info.update(device_name=torch.cuda.get_device_name(self.device), cuda=torch.version.cuda,
                        cudnn=torch.backends.cudnn.version(),
                        allocated_bytes=torch.cuda.memory_allocated(self.device))
        else:
            info.update(device_name="cpu", cuda=None, allocated_bytes=None)
        return info

    # ---- timing helpers

    def _sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def _reset_peak(self) -> None:
        if self.cuda:
            self._sync()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def _peak(self):
        return self.torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def _train(self, which: str, batch, n: int) -> dict:
        model, opt = self.models[which], self.opts[which]
        model.train()
        times, losses = [], []
        self._reset_peak()
        for _ in range(n):
            self._sync()
            start = time.perf_counter()
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            self._sync()
            times.append(time.perf_counter() - start)
            losses.append(float(loss.detach()))  # CPU: the step is already done; CUDA: synced above
            del loss
        return {"times_s": times, "losses": losses, "peak_bytes": self._peak()}

    # ---- commands

    def step(self, which: str, n: int) -> dict:
        if which not in self.models:
            raise KeyError(f"no {which!r} model (built: {sorted(self.models)})")
        return self._train(which, self.batch, n)

    def forward(self, which: str, n: int) -> dict:
        torch = self.torch
        lora_model = self.models["lora"]
        if which == "base":
            if "full" in self.models:
                model, ctx, label = self.models["full"], None, "full model"
            else:
                model, ctx, label = lora_model, lora_model.disable_adapter, "PEFT model, adapters disabled"
        elif which == "lora_unmerged":
            model, ctx, label = lora_model, None, "PEFT model"
        elif which == "lora_merged":
            if self.merged is None:
                self.merged = copy.deepcopy(lora_model).merge_and_unload()
            model, ctx, label = self.merged, None, "merge_and_unload() of a copy"
        else:
            raise ValueError(f"unknown forward {which!r}")
        model.eval()
        times = []
        self._reset_peak()
        try:
            with torch.no_grad():
                for _ in range(n):
                    self._sync()
                    start = time.perf_counter()
                    if ctx is None:
                        logits = model(input_ids=self.batch).logits
                    else:
                        with ctx():
                            logits = model(input_ids=self.batch).logits
                    self._sync()
                    times.append(time.perf_counter() - start)
                    del logits
        finally:
            model.train()
        return {"times_s": times, "peak_bytes": self._peak(), "model": label}

    def long(self, batch: int, seq: int, n: int) -> dict:
        torch = self.torch
        oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
        ids = self._random_ids(batch, seq, self.seed + 1)
        error = None
        try:
            return {**self._train("lora", ids, n), "shape": [batch, seq]}
        except oom as exc:
            error = f"{type(exc).__name__}: {exc}"
        # out of the except block, so the traceback's frames (and their tensors) are gone
        del ids
        self.opts["lora"].zero_grad(set_to_none=True)
        self._free_memory()
        return {"ok": False, "oom": True, "error": error, "shape": [batch, seq]}

    def free(self, which: str) -> dict:
        if which == "lora_merged":
            self.merged = None
        elif which in self.models:
            if which == "lora":
                self.merged = None
            del self.models[which]
            self.opts.pop(which, None)
        else:
            raise KeyError(f"no {which!r} model to free (built: {sorted(self.models)})")
        self._free_memory()
        return {"models": sorted(self.models), "merged": self.merged is not None,
                "allocated_bytes": self.torch.cuda.memory_allocated(self.device) if self.cuda else None}

    def _free_memory(self) -> None:
        gc.collect()
        if self.cuda:
            self._sync()
            self.torch.cuda.empty_cache()


def _handle(peers: Peers | None, msg: dict) -> tuple[Peers | None, dict | None]:
    cmd = msg["cmd"]
    if cmd in ("setup", "setup_config"):
        if peers is not None:  # a second setup: hand the first one's device memory back first
            old, peers = peers, None
            old.models.clear(), old.opts.clear()
            old.merged = None
            old._free_memory()
            del old
        peers = Peers(msg)
        return peers, {"ok": True, **peers.info}
    if cmd == "quit":
        return peers, None
    if peers is None:
        raise RuntimeError(f"{cmd!r} before setup")
    n = int(msg.get("n", 1))
    if cmd == "step":
        answer = peers.step(msg["which"], n)
    elif cmd == "forward":
        answer = peers.forward(msg["which"], n)
    elif cmd == "long":
        answer = peers.long(int(msg.get("batch", 1)), int(msg["seq"]), n)
    elif cmd == "free":
        answer = peers.free(msg["which"])
    else:
        raise ValueError(f"unknown command {cmd!r}")
    return peers, {"ok": True, **answer}


def main() -> int:
    sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the protocol
    peers = None
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
            peers, answer = _handle(peers, msg)
            if answer is None:
                _send({"ok": True})
                return 0
            _send(answer)
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which decides
            _send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
