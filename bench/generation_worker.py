"""transformers' batched ``generate`` timed in a PyTorch process, for ``bench/generation.py``.

Never imported by lora_jax or by the JAX side of the benchmark (it imports torch); run as
``python bench/generation_worker.py`` by a Python that has torch and transformers. It reads one
JSON request on stdin: ``model_dir`` (a Hugging Face folder), ``input_ids`` and ``attention_mask``
(left-padded lists of lists), ``new_tokens``, ``pad_token_id``, ``dtype`` ("float32" or
"bfloat16"), ``warmup``, ``repeats``; and prints one JSON answer: each timed call's seconds, the
generated ids of the last call, and the versions, device and thread count used.
"""

import json
import sys
import time


def _sync(torch):
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(request: dict) -> dict:
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[request["dtype"]]
    model = transformers.AutoModelForCausalLM.from_pretrained(request["model_dir"], dtype=dtype,
                                                              attn_implementation="sdpa").to(device).eval()
    ids = torch.as_tensor(request["input_ids"], dtype=torch.long, device=device)
    mask = torch.as_tensor(request["attention_mask"], dtype=torch.long, device=device)
    kwargs = dict(attention_mask=mask, max_new_tokens=request["new_tokens"], min_new_tokens=request["new_tokens"],
                  do_sample=False, use_cache=True, pad_token_id=request["pad_token_id"])
    times, out = [], None
    with torch.no_grad():
        for i in range(request["warmup"] + request["repeats"]):
            _sync(torch)
            start = time.perf_counter()
            out = model.generate(ids, **kwargs)
            _sync(torch)
            if i >= request["warmup"]:
                times.append(time.perf_counter() - start)
    return {"times_s": times, "tokens": out.cpu().tolist(), "device": device, "threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "attn_implementation": "sdpa"}


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.stdin.read()))))
