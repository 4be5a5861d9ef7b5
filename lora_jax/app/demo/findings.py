"""The demo's findings in words, generated from what it measured (no JAX): verdicts, sections and the claims table.

Every sentence here is built from the results: :mod:`~lora_jax.app.demo.frontier`
matches learning and forgetting, and this module says what the matching
found, for the default demo (one seed, one learning rate per method) and for
``--study`` (:mod:`~lora_jax.app.demo.grid`).
"""

from __future__ import annotations

import numpy as np

from lora_jax.app.demo.frontier import (Comparison, Trajectory, common_level, compare, forgetting_per_seed, group,
                                        levels_table, lowest_per_seed, reach_verdict, spread_text)

FULL = "full fine-tuning"
NOT_IN_DEFAULT = "not measured by the default run: `lora-jax demo --study` measures it"

__all__ = ["CLAIMS", "FULL", "claims_rows", "claims_section", "demo_comparison", "demo_section", "demo_trajectories",
           "names", "study_findings", "study_section", "verdicts"]


def demo_trajectories(result: dict) -> list[Trajectory]:
    """The default demo's two runs as trajectories: full fine-tuning and ``LoRA r=<rank>``."""
    (full, lora), args = result["runs"], result["args"]
    return [Trajectory.from_curve(FULL, full.curve, seed=args["seed"], lr=args["lr_full"]),
            Trajectory.from_curve(f"LoRA r={args['rank']}", lora.curve, seed=args["seed"], lr=args["lr_lora"])]


def demo_comparison(result: dict) -> Comparison:
    """LoRA against full fine-tuning at equal learning, in the default demo's runs.

    >>> from types import SimpleNamespace as S
    >>> runs = [S(curve=[(0, 2.0, 1.0), (10, 1.0, 2.0)]), S(curve=[(0, 2.0, 1.0), (10, 1.5, 1.25)])]
    >>> c = demo_comparison({"runs": runs, "args": {"seed": 0, "rank": 8, "lr_full": 1e-3, "lr_lora": 5e-3}})
    >>> c.a, c.level, c.forgot_a.tolist(), c.forgot_b.tolist()
    ('LoRA r=8', 1.5, [0.25], [0.5])
    """
    return compare(group(demo_trajectories(result)), f"LoRA r={result['args']['rank']}", FULL)


def names(result: dict) -> tuple[str, str]:
    """``(dialect corpus name, base-language corpus name)``, from the corpora's summaries.

    >>> names({"corpora": {"dialect": "code: 4.00 MB train ...", "base": "prose: 1.33 MB train ..."}})
    ('code', 'prose')
    """
    return result["corpora"]["dialect"].split(":")[0], result["corpora"]["base"].split(":")[0]


def demo_section(result: dict, plot_name: str) -> str:
    """The report's section on learning vs forgetting in the default demo's two runs."""
    target, source = names(result)
    trajectories = demo_trajectories(result)
    methods = [t.method for t in trajectories]
    return "\n\n".join([
        "## Learning vs forgetting, at equal learning",
        f"Every evaluation is a point: how far the held-out {target} loss has fallen since step 0 (learning) and "
        f"how far the held-out {source} loss has risen (forgetting). Final losses mix the two: a method that learns "
        f"less in the same steps usually forgets less too. So the methods are compared at a {target} loss both "
        f"reached, interpolating linearly along each trajectory and never beyond it.",
        f"**Verdict:** {demo_comparison(result).sentence(target, source)}",
        levels_table(group(trajectories), methods),
        f"![learning vs forgetting]({plot_name})"])


def study_findings(study, target: str = "code", source: str = "prose") -> dict:
    """``{"comparisons": {LoRA arm: Comparison vs full}, "rank": text, "attention": Comparison}`` of a study."""
    groups = group(study.trajectories)
    lora = [a for a in study.arms if a.rank is not None]
    every = [a.method for a in lora if len(a.targets) > 1]
    attention = next(a for a in lora if len(a.targets) == 1)
    same_rank = next(a.method for a in lora if a.rank == attention.rank and len(a.targets) > 1)
    goal_name = (f"the {target} loss full fine-tuning reached at its demo rate {study.reference_lr[FULL]:.3g} in "
                 f"{study.steps} steps")
    rank = reach_verdict(groups, every, study.goal, goal_name, target=target)
    common = common_level(groups, every)
    rank += " " + (reach_verdict(groups, every, common, f"the {target} loss every rank reached", target=target)
                   if common is not None else f"Not every rank brought the {target} loss below its start.")
    return {"comparisons": {a.method: compare(groups, a.method, FULL) for a in lora}, "rank": rank,
            "attention": compare(groups, attention.method, same_rank), "groups": groups, "every": every}


def _grid_table(study, target: str, source: str) -> str:
    rows = [f"| arm | learning rate | trainable | step time | final {target} loss | {source} loss rise at the end |",
            "|---|---|---|---|---|---|"]
    for arm in study.arms:
        for lr in study.lrs[arm.method]:
            runs = [t for t in study.trajectories if t.method == arm.method and t.lr == lr]
            final = np.array([t.target[-1] for t in runs])
            forgot = np.array([t.forgot[-1] for t in runs])
            rows.append(f"| {arm.method} | {lr:.3g} | {study.trainable[arm.method]:,} | "
                        f"{1e3 * study.step_s[arm.method]:.0f} ms | {spread_text(final)} | +{spread_text(forgot)} |")
    return "\n".join(rows)


def study_section(study, plot_name: str, target: str = "code", source: str = "prose") -> str:
    """The report's section on ``--study``: the grid, the verdicts over seeds, the tables and interference."""
    found = study_findings(study, target, source)
    lrs = {kind: ", ".join(f"{lr:.3g}" for lr in study.lrs[method]) for kind, method in
           (("full", FULL), ("lora", next(m for m in study.lrs if m != FULL)))}
    parts = [
        "## The study: learning rates, ranks, targets and seeds (`--study`)",
        f"{study.description}. Wall time {study.wall_s / 60:.1f} min (estimated before the start: "
        f"{study.estimate_s / 60:.1f} min). Learning rates: full fine-tuning {lrs['full']}; LoRA {lrs['lora']} "
        f"(alpha = 2 x rank at every rank). At each {target} loss a method's forgetting is the least over its "
        f"learning rates (its frontier). A difference counts as beyond seed noise only when the two methods' "
        f"ranges over the {len(study.seeds)} seeds do not overlap.",
        "**Against full fine-tuning, at equal learning:**\n\n" + "\n".join(
            f"- {c.sentence(target, source)}" for c in found["comparisons"].values()),
        f"**Rank:** {found['rank']}",
        f"**Attention only vs every projection:** {found['attention'].sentence(target, source)}",
        levels_table(found["groups"], [FULL, *found["comparisons"]]),
        f"![the study's trajectories]({plot_name})",
        "Every arm and learning rate (mean over seeds, range in brackets):\n\n" + _grid_table(study, target, source)]
    if study.diverged:
        parts.append("Diverged (kept up to the last finite evaluation): " + "; ".join(study.diverged) + ".")
    if study.interference is not None:
        parts += ["### Two adapters together (`lora-jax interference --corpora prose code`)",
                  study.interference.markdown()]
    return "\n\n".join(parts)


def _trainable(result: dict) -> str:
    lora, total = result["runs"][1], result["total_params"]
    rank = result["args"]["rank"]
    text = f"{lora.trainable:,} of {total:,} weights ({100 * lora.trainable / total:.2f}%) at rank {rank}"
    study = result.get("study")
    if study is not None:
        text += "; --study: " + ", ".join(f"{m} {100 * n / total:.2f}%" for m, n in study.trainable.items()
                                          if m != FULL)
    return text


def _file_size(result: dict) -> str:
    sizes = result["sizes"]
    return (f"adapter {sizes['adapter'] / 1e3:.1f} KB (float32) vs base {sizes['base'] / 1e6:.2f} MB (bfloat16): "
            f"{100 * sizes['adapter'] / sizes['base']:.1f}%; a fully fine-tuned copy is {sizes['full'] / 1e6:.2f} MB")


_OUTCOMES = {"less": "forgot less than full fine-tuning, beyond seed noise",
             "more": "forgot more than full fine-tuning, beyond seed noise",
             "within noise": "no difference beyond seed noise", "one seed": "one seed only",
             "unmatched": "no common level of learning (not compared)"}


def _forgetting(result: dict) -> str:
    c = demo_comparison(result)
    text = ("default run: no common level of learning" if c.level is None else
            f"default run (one seed): at equal {names(result)[0]} loss {c.level:.3f}, {c.a} +{c.forgot_a[0]:.3f}, "
            f"{c.b} +{c.forgot_b[0]:.3f} nats/byte")
    study = result.get("study")
    if study is None:
        return text + f"; over seeds and learning rates: {NOT_IN_DEFAULT}"
    buckets: dict[str, list[str]] = {}
    for method, comparison in study_findings(study, *names(result))["comparisons"].items():
        detail = "" if comparison.level is None else f" ({np.mean(comparison.difference):+.3f})"
        buckets.setdefault(comparison.outcome, []).append(method + detail)
    return text + f"; --study ({len(study.seeds)} seeds, difference vs full in brackets): " + "; ".join(
        f"{_OUTCOMES[k]}: {', '.join(v)}" for k, v in buckets.items())


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def _switched(result: dict) -> str:
    checks = result["checks"]
    return (f"adapter off == base model, bitwise: {_yes(checks['adapter_off_equals_base'])}; on again == on, "
            f"bitwise: {_yes(checks['adapter_on_again_equal'])}; base weights untouched by training: "
            f"{_yes(checks['base_params_unchanged'])}")


def _merged(result: dict) -> str:
    checks = result["checks"]
    rel = checks["merged_vs_unmerged_max_abs"] / max(checks["max_abs_logit"], 1e-30)
    return f"max \\|logit difference\\| {checks['merged_vs_unmerged_max_abs']:.3g} ({rel:.2g} of the largest logit)"


def _rank(result: dict) -> str:
    study = result.get("study")
    if study is None:
        return NOT_IN_DEFAULT
    found = study_findings(study, *names(result))
    start = min(float(t.target[0]) for t in study.trajectories)
    if not study.goal < start:
        return (f"full fine-tuning at its demo rate did not lower the {names(result)[0]} loss (ended at "
                f"{study.goal:.3f}, start {start:.3f}): no goal to reach; the study section compares the ranks")
    groups, target = found["groups"], names(result)[0]
    reached = [m for m in found["every"] if np.max(lowest_per_seed(groups[m])) <= study.goal]
    text = f"full fine-tuning's {target} loss after {study.steps} steps ({study.goal:.3f}): " + "; ".join(
        [f"{m} reached it, forgetting +{np.mean(forgetting_per_seed(groups[m], study.goal)):.3f} there"
         for m in reached] +
        [f"{m} did not (lowest {np.min(lowest_per_seed(groups[m])):.3f})" for m in found["every"] if m not in reached])
    common = common_level(groups, found["every"])
    if common is None:
        return text
    forgot = {m: float(np.mean(forgetting_per_seed(groups[m], common))) for m in found["every"]}
    best, worst = min(forgot, key=forgot.get), max(forgot, key=forgot.get)
    return (text + f". At the {target} loss every rank reached ({common:.3f}) the least forgetting: {best} "
            f"+{forgot[best]:.3f}, the most: {worst} +{forgot[worst]:.3f} (mean over seeds)")


def _interference(result: dict) -> str:
    study = result.get("study")
    if study is None or study.interference is None:
        return NOT_IN_DEFAULT + " (or `lora-jax interference`)"
    inter = study.interference
    f, names = inter.functional, list(inter.names)
    adds = "; ".join(f"adding the {names[j]} adapter raised the {names[i]} adapter's {names[i]} loss by "
                     f"{f.increase[i, j]:+.3f}" for i in range(len(names)) for j in range(len(names)) if i != j)
    return f"{adds}; mean subspace overlap {inter.overlap[0, 1]:.3f} (1 = the same subspace, 0 = orthogonal)"


#: The claims: what the seed says, and the function that states what was measured.
CLAIMS = {
    "trainable share": ("LoRA trains a small share of the weights", _trainable),
    "adapter file vs base": ("an adapter is saved in a few MB, far smaller than the model", _file_size),
    "forgetting at equal learning": ("LoRA does not make the model forget what it knew", _forgetting),
    "adapters switched at run time": ("adapters stay unmerged and are swapped at run time", _switched),
    "merged == unmerged": ("merging gives zero-overhead inference with the same outputs", _merged),
    "rank choice": ("a small rank is enough", _rank),
    "interference of two adapters": ("adapters trained on different data can be combined", _interference),
}


def claims_rows(result: dict) -> list[tuple[str, str, str]]:
    """``(claim, what the seed says, what we measured)`` for every entry of :data:`CLAIMS`."""
    return [(claim, says, measure(result)) for claim, (says, measure) in CLAIMS.items()]


def claims_section(result: dict) -> str:
    """The table "What the seed says, and what we measured"."""
    rows = ["| | the seed says | we measured |", "|---|---|---|"]
    rows += [f"| {claim} | {says} | {measured} |" for claim, says, measured in claims_rows(result)]
    return "## What the seed says, and what we measured\n\n" + "\n".join(rows)


def verdicts(result: dict) -> dict:
    """The verdicts as data, for ``results.json``: each comparison's numbers beside its sentence, and the claims."""
    target, source = names(result)
    c = demo_comparison(result)
    out = {"demo": {**c.to_dict(), "sentence": c.sentence(target, source)}}
    study = result.get("study")
    if study is not None:
        found = study_findings(study, target, source)
        out["study"] = {"goal": study.goal, "rank": found["rank"],
                        "attention": {**found["attention"].to_dict(),
                                      "sentence": found["attention"].sentence(target, source)},
                        "comparisons": {m: {**x.to_dict(), "sentence": x.sentence(target, source)}
                                        for m, x in found["comparisons"].items()}}
    out["claims"] = [list(row) for row in claims_rows(result)]
    return out
