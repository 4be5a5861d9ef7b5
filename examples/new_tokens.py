"""New tokens, new meaning: teach a model what three emoji mean by adapting its embedding table alone.

Tokenizers often reserve ids that pretraining never uses (Llama 3's
``<|reserved_special_token_N|>``, for one). Give such a row a new job, here an emoji that
stands for a word the model already knows, and only that row has to learn: an
embedding adapter whose other rows stay exactly zero leaves every other token
exactly as it was. The story:

  1. pretrain a tiny one-layer Llama with a tied head (the output layer is the embedding
     table, via ``Embed.attend``) on a toy world of sentences about eight animals,
     ``the cat says meow . it lives in the house .``. The 64-row table holds 49
     words; the other 15 rows are reserved and never occur in the pretraining text;
  2. name three reserved rows 🐱 🐶 🐮 (meaning cat, dog, cow) and fine-tune on text
     that writes those animals as their emoji about half of the time, but only ever
     says what an emoji animal *says* and what it *eats*;
  3. adapt ONLY the embedding layer (``LoraConfig(targets="embedding")``) and train
     only the new tokens' rows of ``A`` (a gradient mask, ``only_rows`` below). ``B``
     trains too, but it can only move rows whose ``A`` row is nonzero;
  4. measure the held-out facts that the fine-tuning text never states about an
     emoji (where it *lives*, what it *is*): a model gets those right only if the
     emoji has come to mean its animal. Then check that the merged table differs
     from the base in exactly the three new rows, bitwise, and merged == unmerged.

Because the head is tied and ``lora_apply`` adapts ``Embed.attend`` with the same
factors, the three new rows also let the model *write* the emoji (measured below).
The flip side: every softmax now has three more live entries, so text without any
emoji scores slightly differently although no old row changed (printed too). An
untied head would leave such text bitwise unchanged, and the emoji unwritable.

Run from the repository root (20 to 30 seconds on 2 CPU cores, about half of it compiling):
  python examples/new_tokens.py [--pretrain-steps 400] [--steps 150] [--rank 4] [--lr 2e-2] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM, causal_lm_loss

# ---- the toy world: each animal's sound, food, home and look, stated by one relation each
ANIMALS = {
    "cat": ("meow", "mice", "house", "black"),
    "dog": ("woof", "bones", "kennel", "brown"),
    "cow": ("moo", "grass", "barn", "spotted"),
    "duck": ("quack", "bread", "pond", "yellow"),
    "horse": ("neigh", "oats", "stable", "tall"),
    "sheep": ("baa", "hay", "meadow", "woolly"),
    "frog": ("ribbit", "flies", "swamp", "green"),
    "owl": ("hoot", "moths", "oak", "wise"),
}
RELATIONS = (("says",), ("eats",), ("lives", "in", "the"), ("is",))
TAUGHT = (0, 1)      # what the fine-tuning text states about an emoji animal
HELDOUT = (2, 3)     # what it never does: the test of meaning
NEW_TOKENS = {"🐱": "cat", "🐶": "dog", "🐮": "cow"}
VOCAB = 64
WORDS = sorted({"the", "a", "it", ".", *ANIMALS, *(w for r in RELATIONS for w in r),
                *(w for facts in ANIMALS.values() for w in facts)})
# The reserved rows follow the words; the new tokens take the first three of them.
TOKENS = WORDS + list(NEW_TOKENS) + [f"<reserved_{i}>" for i in range(VOCAB - len(WORDS) - len(NEW_TOKENS))]
ID = {token: i for i, token in enumerate(TOKENS)}
NEW_IDS = np.array([ID[t] for t in NEW_TOKENS])


def sentence(animal: str, relation: int, subject: str) -> list[str]:
    """``[*subject, *relation words, fact, "."]``, e.g. ``the cat lives in the house .``"""
    return [*subject.split(), *RELATIONS[relation], ANIMALS[animal][relation], "."]


def stream(rng: np.random.Generator, n_tokens: int, *, emoji: float = 0.0) -> list[str]:
    """``n_tokens`` of random sentences; two in five continue with the same animal, called ``it``.

    With ``emoji > 0`` (the fine-tuning text) a cat, dog or cow is written as its emoji with that
    probability, and then it (and its ``it`` follow-ups) only says what it says or eats.
    """
    emoji_of = {word: token for token, word in NEW_TOKENS.items()}
    out, animal, as_emoji = [], None, False
    while len(out) < n_tokens:
        if animal is None or rng.random() >= 0.4:
            animal = list(ANIMALS)[rng.integers(len(ANIMALS))]
            as_emoji = animal in emoji_of and rng.random() < emoji
            subject = ("the", "a")[rng.integers(2)] + " " + (emoji_of[animal] if as_emoji else animal)
        else:
            subject = "it"
        relations = TAUGHT if as_emoji else range(len(RELATIONS))
        out += sentence(animal, relations[rng.integers(len(relations))], subject)
    return out[:n_tokens]


def encode(tokens: list[str]) -> np.ndarray:
    return np.array([ID[t] for t in tokens], np.int32)


def windows(rng: np.random.Generator, n: int, seq: int, *, emoji: float = 0.0) -> np.ndarray:
    """``[n, seq]`` token ids, each row its own random text."""
    return np.stack([encode(stream(rng, seq, emoji=emoji)) for _ in range(n)])


def probes(rng: np.random.Generator, seq: int, contexts: int):
    """Held-out facts about the new animals, each one closing a ``seq``-token window of random text.

    Returns ``(with_emoji, with_word, prompts)``: two ``[n, seq]`` id arrays identical but where
    the animal is named, whose fact token is at ``seq - 2`` (``.`` follows), and each row's prompt.
    Even rows name the animal in the fact's own sentence; odd rows one sentence earlier (``it``).
    """
    rows = {True: [], False: []}
    prompts = []
    for token, animal in NEW_TOKENS.items():
        for relation in HELDOUT:
            for c in range(contexts):
                before = rng.integers(1 << 30)      # the same filler text for both spellings
                for as_emoji in (True, False):
                    subject = "the " + (token if as_emoji else animal)
                    probe = sentence(animal, relation, subject) if c % 2 == 0 else (
                        sentence(animal, TAUGHT[c // 2 % 2], subject) + sentence(animal, relation, "it"))
                    text = stream(np.random.default_rng(before), seq) + probe
                    rows[as_emoji].append(encode(text[-seq:]))
                    if as_emoji:
                        prompts.append(" ".join(probe[:-2]))
    return np.stack(rows[True]), np.stack(rows[False]), prompts


def token_losses(logits, ids) -> np.ndarray:
    """``[n, seq - 1]`` next-token losses (nats): entry ``t`` is the loss of ``ids[:, t + 1]``."""
    z = np.asarray(logits[:, :-1], np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(logp, np.asarray(ids)[:, 1:, None], axis=-1)[..., 0]


def init_params(model, seq_len: int, rng: np.random.Generator) -> dict:
    """Fresh weights, drawn as the model's own initializers draw them: N(0, 0.02) matrices, RMSNorm scales 1.

    ``jax.jit(model.init)`` would compile a whole forward pass for this one call; NumPy costs nothing.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))["params"]
    draw = lambda path, leaf: (np.ones(leaf.shape, np.float32) if path[-1].key == "weight" else
                               rng.normal(0.0, 0.02, leaf.shape).astype(np.float32))
    return jax.tree_util.tree_map_with_path(lambda path, leaf: jnp.asarray(draw(path, leaf)), shapes)


def pretrain(model, args, rng):
    """Full training on the world's text, in which the reserved rows (and so the emoji) never occur."""
    params = init_params(model, args.seq_len, rng)
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, args.pretrain_steps, 3e-4))
    step = lora_jax.make_full_train_step(lambda p, ids: model.apply({"params": p}, ids),
                                         lambda m, ids: causal_lm_loss(m(ids), ids), tx)
    opt_state = tx.init(params)
    for _ in range(args.pretrain_steps):
        params, opt_state, metrics = step(params, opt_state, windows(rng, args.batch_size, args.seq_len))
    print(f"pretrained {args.pretrain_steps} steps: train loss {float(metrics['loss']):.4f}")
    return params


def only_rows(mask) -> optax.GradientTransformation:
    """Multiplies every gradient by ``mask`` (a pytree like the adapters) before the optimizer.

    Why: row ``i`` of the embedding's ``A`` gets a gradient whenever token ``i`` is read, and with
    a tied head from every softmax over the vocabulary, i.e. all 64 rows at every position.
    Unmasked, the adapter would retrain the whole table. Masked, the other rows' gradients and
    Adam moments stay zero, so their updates are exactly 0, their ``A`` rows stay exactly zero,
    and their delta ``scale * A[i] @ B`` is exactly 0 however ``B`` moves.
    """
    return optax.stateless(lambda updates, params=None: jax.tree.map(jnp.multiply, updates, mask))


def cosine(u, v) -> float:
    return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=400, help="pretraining steps (default 400)")
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps of the adapter (default 150)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank of the embedding adapter (default 4)")
    parser.add_argument("--lr", type=float, default=2e-2, help="Adam rate of the adapter (default 2e-2)")
    parser.add_argument("--layers", type=int, default=1, help="decoder layers of the model (default 1)")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per step (default 32)")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per window (default 32)")
    parser.add_argument("--contexts", type=int, default=8,
                        help="held-out probes per new token and relation (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, adapter and data (default 0)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)

    # 1. The base model, pretrained here: its output head is the embedding table (tied).
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=args.layers, num_attention_heads=4,
                                         tie_word_embeddings=True, max_position_embeddings=args.seq_len))
    print(f"vocabulary: {len(WORDS)} words + {VOCAB - len(WORDS)} reserved rows that pretraining never sees; "
          "new tokens " + ", ".join(f"{t} = {w} (row {ID[t]})" for t, w in NEW_TOKENS.items()))
    base = pretrain(model, args, rng)
    base_table = np.array(base["model"]["embed_tokens"]["embedding"])   # a host copy to compare against

    # 2./3. An adapter on the embedding only: A [64, r] = 0 and B [r, 64] ~ N(0, 1), so the adapted
    #       model starts exactly as the base. Embed.attend (the tied head) uses the same factors.
    config = lora_jax.LoraConfig(rank=args.rank, alpha=args.rank, targets=("embedding",))
    train_rng = np.random.default_rng(args.seed + 1)
    first = jnp.asarray(windows(train_rng, args.batch_size, args.seq_len, emoji=0.5))
    lora = lora_jax.init_lora(model, base, config, first, rng=jax.random.key(args.seed + 1))
    a_shape, b_shape = lora["model"]["embed_tokens"]["a"].shape, lora["model"]["embed_tokens"]["b"].shape
    keep = np.zeros(a_shape, np.float32)
    keep[NEW_IDS] = 1.0
    mask = {"model": {"embed_tokens": {"a": jnp.asarray(keep), "b": jnp.ones(b_shape)}}}
    trainable, total = len(NEW_IDS) * args.rank + int(np.prod(b_shape)), lora_jax.count_params(base)
    adapted = ", ".join("/".join(path) for path in lora_jax.adapter_paths(lora))
    print(f"adapted layers: {adapted} (its lookup and its attend, the tied head); A {list(a_shape)}, "
          f"B {list(b_shape)}, scale {config.scaling('model/embed_tokens'):g}")
    print(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%): "
          f"{len(NEW_IDS)} rows of A x rank {args.rank} + B {b_shape[0]}x{b_shape[1]}; "
          f"the stored adapter holds {lora_jax.count_params(lora):,}")

    # One batch, one compiled forward, for every measurement: held-out facts written with the emoji
    # and with the words, text without emoji, and fine-tuning-style text (where emoji get written).
    emoji_probes, word_probes, prompts = probes(np.random.default_rng(args.seed + 2), args.seq_len, args.contexts)
    n = len(prompts)
    plain = windows(np.random.default_rng(args.seed + 3), n, args.seq_len)
    mixed = windows(np.random.default_rng(args.seed + 4), n, args.seq_len, emoji=0.5)
    evaluation = np.concatenate([emoji_probes, word_probes, plain, mixed])
    apply = lora_jax.lora_apply(model, config)
    forward = jax.jit(lambda lora_params: apply(base, lora_params, jnp.asarray(evaluation)))
    fact = args.seq_len - 3          # token_losses index of the fact token (at seq - 2)
    writes_emoji = np.isin(mixed[:, 1:], NEW_IDS)

    def measure(lora_params) -> dict:
        logits = np.asarray(forward(lora_params))
        losses = token_losses(logits, evaluation)
        guesses = np.argmax(logits[:, fact], axis=-1)
        parts = np.split(np.arange(4 * n), 4)
        return {"emoji": losses[parts[0], fact], "word": losses[parts[1], fact],
                "emoji_hits": guesses[parts[0]] == evaluation[parts[0], fact + 1],
                "word_hits": guesses[parts[1]] == evaluation[parts[1], fact + 1], "guess": guesses[parts[0]],
                "plain": losses[parts[2]].mean(), "writes": losses[parts[3]][writes_emoji].mean(),
                "logits": logits}

    before = measure(lora)

    tx = optax.chain(only_rows(mask), optax.adam(args.lr))
    step = lora_jax.make_train_step(apply, lambda m, ids: causal_lm_loss(m(ids), ids), tx)
    opt_state = tx.init(lora)
    batch = first
    for i in range(1, args.steps + 1):
        lora, opt_state, metrics = step(lora, opt_state, base, batch)
        if i == 1 or i == args.steps:
            print(f"fine-tune step {i:4d}  train loss {float(metrics['loss']):.4f}")
        batch = jnp.asarray(windows(train_rng, args.batch_size, args.seq_len, emoji=0.5))
    after = measure(lora)

    # 4. Meaning: facts the fine-tuning never stated about an emoji.
    print(f"\nheld-out facts about the new tokens ({n} probes: where each lives, what it is), "
          "loss on the fact word (nats) / accuracy:")
    print(f"  written with the new token: before {before['emoji'].mean():.4f} / {before['emoji_hits'].mean():.3f}"
          f" -> after {after['emoji'].mean():.4f} / {after['emoji_hits'].mean():.3f}")
    print(f"  the same with the original word: base {before['word'].mean():.4f} / {before['word_hits'].mean():.3f}"
          f", adapted {after['word'].mean():.4f} / {after['word_hits'].mean():.3f}")
    for k in range(0, n, args.contexts):
        print(f"    {prompts[k]:<22} ...  base: {TOKENS[before['guess'][k]]:<8} adapted: {TOKENS[after['guess'][k]]}")
    merged = lora_jax.merge(base, lora, config)
    table = np.asarray(merged["model"]["embed_tokens"]["embedding"])
    for token, word in NEW_TOKENS.items():
        nearest = WORDS[int(np.argmax([cosine(table[ID[token]], base_table[j]) for j in range(len(WORDS))]))]
        print(f"  cosine({token}, {word}): before {cosine(base_table[ID[token]], base_table[ID[word]]):+.3f} -> "
              f"after {cosine(table[ID[token]], base_table[ID[word]]):+.3f}; nearest word now: {nearest}")
    print(f"writing the new tokens (tied head): loss where the next token is an emoji: "
          f"before {before['writes']:.4f} -> after {after['writes']:.4f} (writing them as often as the text does: "
          f"ln 16 = {np.log(16):.4f})")
    print(f"text without emoji: loss base {before['plain']:.4f}, adapted {after['plain']:.4f} "
          "(the tied softmax now has the three new rows in it)")

    # Exactly the new rows changed; every other row is bitwise the base's (its A row is still 0).
    others = np.setdiff1d(np.arange(VOCAB), NEW_IDS)
    changed = np.flatnonzero(np.any(table != base_table, axis=1))
    print(f"\nmerged table vs base: max |diff| over the {len(others)} other rows "
          f"{float(np.max(np.abs(table[others] - base_table[others]))):g}, bitwise equal "
          f"{np.array_equal(table[others], base_table[others])}; rows changed: {len(changed)} "
          f"({' '.join(TOKENS[i] for i in changed)})")
    logits_merged = np.asarray(jax.jit(model.apply)({"params": merged}, jnp.asarray(evaluation)))
    print(f"merged vs unmerged: max |logit diff| {np.max(np.abs(logits_merged - after['logits'])):.3g} "
          f"(max |logit| {np.max(np.abs(after['logits'])):.3g})")
    print(f"\ndone in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
