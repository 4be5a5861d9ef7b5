"""PyTorch/PEFT rows for the accelerator benchmark, measured by ``bench/peft_worker.py`` in a subprocess.

This module never imports torch: it starts the worker under a Python that has
``torch``, ``transformers`` and ``peft`` (``sys.executable`` unless told
otherwise) and talks to it in JSON lines (the protocol is described in
``bench/peft_worker.py``). The sequence :func:`measure` runs:

1. ``setup_config``: a random-init ``LlamaForCausalLM`` on the device (CUDA
   when torch sees one, else the CPU) in bfloat16, sdpa attention, a full
   fine-tune copy and a PEFT LoRA copy, AdamW on each, one random batch;
2. training steps: ``warmup`` untimed-for-the-median steps of each, then
   ``repeats`` timed steps alternating full, LoRA, full, LoRA, ...; each step
   is timed inside the worker between ``torch.cuda.synchronize()`` calls, and
   the device's peak bytes are taken over the timed steps;
3. forwards (``torch.no_grad()``, eval mode): base, unmerged LoRA, merged LoRA;
4. the full model is freed, then a LoRA step at batch ``long_batch`` x
   ``long_seq`` (an out-of-memory error is recorded, not raised).

Every request has a timeout: answers are read by a thread into a queue, and a
worker that does not answer in time is killed and the error recorded in the
returned dict; the caller never hangs. ``python -m bench.torch_gpu --tiny``
runs a toy size on whatever device torch has and prints the dict as JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

WORKER = Path(__file__).resolve().parent / "peft_worker.py"
GIB = 2 ** 30
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY = dict(config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2),
            batch=2, seq=32, long_seq=128)


class WorkerError(RuntimeError):
    """The worker answered ``ok: false``; it is still alive and usable."""

    def __init__(self, answer: dict):
        super().__init__(answer.get("error", "unknown error"))
        self.answer = answer


class WorkerDied(RuntimeError):
    """The worker timed out (and was killed), exited, or answered something unreadable."""


class TorchRows:
    """One PyTorch worker process and the requests of the benchmark, each with a timeout."""

    def __init__(self, python: str | None = None, *, timeout_s: float = 600.0, setup_timeout_s: float | None = None,
                 env: dict | None = None, echo_stderr: bool = True):
        self.python = python or sys.executable
        self.timeout_s = timeout_s
        self.setup_timeout_s = setup_timeout_s or timeout_s
        self.env = env
        self.echo_stderr = echo_stderr
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}
        self._answers: queue.Queue = queue.Queue()
        self._stderr = collections.deque(maxlen=40)
        self._threads: list[threading.Thread] = []

    # ---- the process

    def start(self) -> "TorchRows":
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen([self.python, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1, env=env)
        self._threads = [threading.Thread(target=self._read_stdout, args=(self.proc.stdout,), daemon=True),
                         threading.Thread(target=self._read_stderr, args=(self.proc.stderr,), daemon=True)]
        for thread in self._threads:
            thread.start()
        return self

    def _read_stdout(self, pipe) -> None:
        for line in pipe:
            line = line.strip()
            if not line:
                continue
            try:
                self._answers.put(json.loads(line))
            except json.JSONDecodeError:
                self._stderr.append(f"[stdout, not JSON] {line}")
        self._answers.put(None)  # end of stream: the worker exited

    def _read_stderr(self, pipe) -> None:
        for line in pipe:
            self._stderr.append(line.rstrip("\n"))
            if self.echo_stderr:
                sys.stderr.write(f"[torch worker] {line}")
                sys.stderr.flush()

    def stderr_tail(self, lines: int = 10) -> str:
        if self.proc is not None and self.proc.poll() is not None:
            for thread in self._threads:  # the worker is gone: let the readers drain its last words
                thread.join(timeout=2.0)
        return "\n".join(list(self._stderr)[-lines:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass

    def close(self, timeout_s: float = 30.0) -> None:
        if self.alive():
            try:
                self.ask("quit", timeout_s=timeout_s)
                self.proc.wait(timeout=timeout_s)
            except (WorkerDied, WorkerError, subprocess.TimeoutExpired, OSError):
                pass
        self.kill()

    def __enter__(self) -> "TorchRows":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- one request

    def ask(self, cmd: str, *, timeout_s: float | None = None, **msg) -> dict:
        """Sends one request and returns the answer (without ``ok``); raises WorkerError or WorkerDied."""
        if not self.alive():
            raise WorkerDied(f"the PyTorch worker is not running (exit code "
                             f"{None if self.proc is None else self.proc.poll()}); stderr: {self.stderr_tail()}")
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            self.proc.stdin.write(json.dumps({"cmd": cmd, **msg}) + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            self.kill()
            raise WorkerDied(f"writing {cmd!r} to the PyTorch worker failed ({exc}); stderr: {self.stderr_tail()}")
        try:
            answer = self._answers.get(timeout=timeout_s)
        except queue.Empty:
            self.kill()
            raise WorkerDied(f"the PyTorch worker did not answer {cmd!r} within {timeout_s:g} s and was killed; "
                             f"stderr: {self.stderr_tail()}") from None
        if answer is None:
            code = self.proc.wait()
            raise WorkerDied(f"the PyTorch worker exited (code {code}) during {cmd!r}; stderr: {self.stderr_tail()}")
        if not answer.pop("ok", False):
            raise WorkerError(answer)
        return answer

    # ---- the benchmark's requests

    def setup_config(self, config: dict, *, batch: int, seq: int, rank: int, alpha: float, targets=TARGETS,
                     lr: float = 1e-4, weight_decay: float = 1e-4, seed: int = 0, device: str = "auto",
                     dtype: str = "bfloat16", which=("full", "lora")) -> dict:
        self.info = self.ask("setup_config", timeout_s=self.setup_timeout_s, config=dict(config), device=device,
                             dtype=dtype, batch=batch, seq=seq, rank=rank, alpha=alpha, targets=list(targets),
                             lr=lr, weight_decay=weight_decay, seed=seed, which=list(which))
        return self.info

    def step(self, which: str, n: int = 1) -> dict:
        return self.ask("step", which=which, n=n)

    def forward(self, which: str, n: int = 1) -> dict:
        return self.ask("forward", which=which, n=n)

    def long(self, batch: int, seq: int, n: int = 1) -> dict:
        return self.ask("long", batch=batch, seq=seq, n=n)

    def free(self, which: str) -> dict:
        return self.ask("free", which=which)

    def train_steps(self, which=("full", "lora"), *, warmup: int, repeats: int) -> dict:
        """``warmup`` steps of each model, then ``repeats`` rounds of one step each, in alternation.

        Returns ``{which: {"times_s", "losses", "warmup_times_s", "warmup_losses", "peak_bytes"}}``;
        ``peak_bytes`` is the largest of the timed steps' peaks.
        """
        out = {w: {"times_s": [], "losses": [], "warmup_times_s": [], "warmup_losses": [], "peak_bytes": None}
               for w in which}
        for w in which:
            if warmup:
                a = self.step(w, warmup)
                out[w]["warmup_times_s"], out[w]["warmup_losses"] = a["times_s"], a["losses"]
        for _ in range(repeats):
            for w in which:
                a = self.step(w, 1)
                out[w]["times_s"] += a["times_s"]
                out[w]["losses"] += a["losses"]
                if a.get("peak_bytes") is not None:
                    out[w]["peak_bytes"] = max(out[w]["peak_bytes"] or 0, a["peak_bytes"])
        return out

    def forwards(self, which=("base", "lora_unmerged", "lora_merged"), *, warmup: int, repeats: int) -> dict:
        """Per forward kind, ``warmup`` untimed calls then ``repeats`` timed ones, in alternation."""
        out = {w: {"times_s": [], "peak_bytes": None, "model": None} for w in which}
        for w in which:
            if warmup:
                self.forward(w, warmup)
        for _ in range(repeats):
            for w in which:
                a = self.forward(w, 1)
                out[w]["times_s"] += a["times_s"]
                out[w]["model"] = a.get("model")
                if a.get("peak_bytes") is not None:
                    out[w]["peak_bytes"] = max(out[w]["peak_bytes"] or 0, a["peak_bytes"])
        return out


# ---- summaries

def summarize(times_s: list[float], tokens: int) -> dict:
    """Median, min, max and tokens/s of a list of step times (``None`` fields when it is empty)."""
    if not times_s:
        return {"median_s": None, "min_s": None, "max_s": None, "tokens_per_s": None, "n": 0}
    median = statistics.median(times_s)
    return {"median_s": median, "min_s": min(times_s), "max_s": max(times_s), "tokens_per_s": tokens / median,
            "n": len(times_s)}


def _gib(value):
    return None if value is None else value / GIB


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def measure(*, config: dict, batch: int, seq: int, long_seq: int | None = None, long_batch: int = 1,
            long_steps: int | None = None, rank: int = 8, alpha: float = 16, targets=TARGETS, lr: float = 1e-4,
            weight_decay: float = 1e-4, seed: int = 0, warmup: int = 2, repeats: int = 10,
            forward_repeats: int | None = None, device: str = "auto", dtype: str = "bfloat16",
            python: str | None = None, timeout_s: float = 600.0, setup_timeout_s: float | None = None,
            free_full_before_long: bool = True, echo_stderr: bool = True) -> dict:
    """Runs the PyTorch/PEFT side of the benchmark and returns its rows; never raises for worker trouble.

    The dict: ``python``, ``config`` (what was asked), ``info`` (the worker's
    setup answer), ``versions`` (torch, transformers, peft, cuda, device),
    ``device_name``, ``params`` (base, LoRA trainable, LoRA modules),
    ``steps`` (``full``/``lora``: median_s, min_s, max_s, tokens_per_s, n,
    times_s, losses, first_loss, warmup_losses, peak_bytes, peak_gib),
    ``forwards`` (``base``/``lora_unmerged``/``lora_merged``: the same timing
    keys, peak_bytes, peak_gib, model), ``long`` (the long-context LoRA step:
    shape, timing keys, losses, peak_bytes, peak_gib; or ``error`` and
    ``oom``), ``errors`` (phase -> text), ``ok`` (no errors), ``wall_s``, and
    ``error`` (the first error's text, only when setup or the worker failed so
    nothing after it was measured).
    """
    start = time.perf_counter()
    tokens = batch * seq
    forward_repeats = repeats if forward_repeats is None else forward_repeats
    long_steps = max(1, min(repeats, 3)) if long_steps is None else long_steps
    result: dict = {"python": python or sys.executable,
                    "config": {"model": dict(config), "batch": batch, "seq": seq, "long_batch": long_batch,
                               "long_seq": long_seq, "rank": rank, "alpha": alpha, "targets": list(targets),
                               "lr": lr, "weight_decay": weight_decay, "seed": seed, "warmup": warmup,
                               "repeats": repeats, "forward_repeats": forward_repeats, "long_steps": long_steps,
                               "device": device, "dtype": dtype, "timeout_s": timeout_s},
                    "errors": {}}
    rows = TorchRows(python, timeout_s=timeout_s, setup_timeout_s=setup_timeout_s, echo_stderr=echo_stderr)

    def phase(name, fn):
        """Runs one phase; records its error. False when the worker is gone (stop there)."""
        try:
            fn()
            return True
        except WorkerError as exc:
            result["errors"][name] = str(exc)
            return rows.alive()
        except Exception as exc:  # noqa: BLE001 - WorkerDied and anything unexpected
            result["errors"][name] = _error(exc)
            return False

    def do_setup():
        info = rows.setup_config(config, batch=batch, seq=seq, rank=rank, alpha=alpha, targets=targets, lr=lr,
                                 weight_decay=weight_decay, seed=seed, device=device, dtype=dtype)
        result["info"] = info
        result["versions"] = {k: info.get(k) for k in ("torch", "transformers", "peft", "cuda")}
        result["versions"]["device"] = info.get("device_name")
        result["device_name"] = info.get("device_name")
        result["params"] = {k: info.get(k) for k in ("base_params", "lora_trainable_params", "lora_modules")}

    def do_steps():
        raw = rows.train_steps(("full", "lora"), warmup=warmup, repeats=repeats)
        result["steps"] = {w: {**summarize(r["times_s"], tokens), "times_s": r["times_s"], "losses": r["losses"],
                               "first_loss": (r["warmup_losses"] or r["losses"] or [None])[0],
                               "warmup_losses": r["warmup_losses"], "peak_bytes": r["peak_bytes"],
                               "peak_gib": _gib(r["peak_bytes"])}
                           for w, r in raw.items()}

    def do_forwards():
        raw = rows.forwards(warmup=warmup, repeats=forward_repeats)
        result["forwards"] = {w: {**summarize(r["times_s"], tokens), "times_s": r["times_s"],
                                  "peak_bytes": r["peak_bytes"], "peak_gib": _gib(r["peak_bytes"]),
                                  "model": r["model"]}
                              for w, r in raw.items()}
        rows.free("lora_merged")

    def do_long():
        if free_full_before_long:
            rows.free("full")
        try:
            a = rows.long(long_batch, long_seq, long_steps)
        except WorkerError as exc:
            result["long"] = {"shape": [long_batch, long_seq], "error": str(exc), "oom": bool(exc.answer.get("oom"))}
            return
        times = a["times_s"][1:] if len(a["times_s"]) > 1 else a["times_s"]  # the first one warms up
        result["long"] = {"shape": a.get("shape", [long_batch, long_seq]), **summarize(times, long_batch * long_seq),
                          "times_s": a["times_s"], "losses": a["losses"], "peak_bytes": a["peak_bytes"],
                          "peak_gib": _gib(a["peak_bytes"])}

    try:
        rows.start()
        going = phase("setup", do_setup) and "setup" not in result["errors"]
        going = going and phase("steps", do_steps)
        going = going and phase("forwards", do_forwards)
        if going and long_seq:
            phase("long", do_long)
    except Exception as exc:  # noqa: BLE001 - e.g. the Python could not be started
        result["errors"]["start"] = _error(exc)
    finally:
        rows.close()
    if "setup" in result["errors"] or "start" in result["errors"] or not result.get("steps"):
        first = next(iter(result["errors"].values()), "no steps measured")
        result["error"] = first
    result["ok"] = not result["errors"]
    result["wall_s"] = time.perf_counter() - start
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a toy size (vocab 256, hidden 64, 2 layers)")
    parser.add_argument("--python", default=None, help="the Python with torch, transformers and peft "
                                                       "(default: this one)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when torch sees one)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="timed steps of each (default 3 tiny, 10)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--quiet", action="store_true", help="do not echo the worker's stderr")
    args = parser.parse_args(argv)
    if args.tiny:
        size = TINY
    else:  # TinyLlama-1.1B's shape, batch 8 x 1024, long 1 x 8192 (bench/gpu.py's workload)
        size = dict(config=dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                num_attention_heads=32, num_key_value_heads=4), batch=8, seq=1024, long_seq=8192)
    repeats = args.repeats if args.repeats is not None else (3 if args.tiny else 10)
    result = measure(**size, warmup=args.warmup, repeats=repeats, device=args.device, dtype=args.dtype,
                     python=args.python, timeout_s=args.timeout, echo_stderr=not args.quiet)
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
