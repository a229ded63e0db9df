# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Adapters inside a real model: does extra rank buy better fine-tuning?
#
# The reconstruction notebooks ask how well each adapter family can *express* a
# given matrix at the parameter budget of rank-$r$ LoRA. Here every family is
# *trained* inside a model, against full fine-tuning, and we ask three questions:
#
# 1. does each adapter learn the task, at exactly the budget it is given?
# 2. how does its learned update $\Delta W$ relate to full fine-tuning's $\Delta W_f$
#    (rank, cosine similarity, overlap of the top singular subspaces)?
# 3. does "expresses $\Delta W_f$ better" (a lower reconstruction error at the same
#    budget, from `reconstruction.fit`) go with "fine-tunes better"?
#
# By default (and in CI, in about a minute) the model is the ABBA paper's toy: an
# MLP pre-trained on the digits 0-7 of scikit-learn's 8x8 digits, fine-tuned on 8 vs 9,
# every method at the budget of rank-8 LoRA, 2 seeds. The same code reads a full
# comparison (`python -m finetune.compare ...` writes a `compare-*.json` beside its
# runs) when `ADAPTERS_COMPARISON` names one, or when the MiniLM comparison exists at
# `runs/minilm/movie/compare-r8-100steps.json`: its section is at the end.

# %%
import json
import math
import os
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import theory
from finetune import analysis as AN
from finetune import compare as C
from finetune import runs as R

t0 = time.perf_counter()
torch.set_num_threads(1)  # tiny matrices: one thread is the fastest, and fair on a shared box
OUT = Path(tempfile.mkdtemp(prefix="adapters-nb-"))
RANK, SEEDS, STEPS = 8, (0, 1), 150

rows, _ = C.plan_rows(C.ALL, "ours")
configs = C.plan("mlp", "digits", rows, rank=RANK, seeds=SEEDS, steps=STEPS)
results = C.execute(configs, OUT)
assert all(r["status"] == "trained" for r in results), [r for r in results if r["status"] != "trained"]
comp = C.compare_rows(configs, OUT, k=RANK, fit_steps=300)
print(C.format_table(comp))
print(f"{len(configs)} runs and the fits in {time.perf_counter() - t0:.0f} s")
by = {r["method"]: r for r in comp["rows"]}

# %% [markdown]
# ## 1. Every adapter learns the task, at the budget it is given
#
# The pre-trained MLP has never seen an 8 or a 9: its held-out accuracy on them starts
# at 0. After fine-tuning, every method separates them. The budget is a per-layer
# contract: no adapter has more trainable parameters than rank-8 LoRA on the same
# layers (VeRA has far fewer: only its two scaling vectors train).

# %%
for r in comp["rows"]:
    assert r["metric_before"] < 0.05, r["method"]
    assert r["metric_mean"] > 0.85, (r["method"], r["metric_mean"])
budget = by["lora"]["trainable_params"]
assert all(r["trainable_params"] <= budget for r in comp["rows"] if r["method"] != "full")
assert by["full"]["trainable_params"] > 5 * budget
print(f"accuracy before: {by['lora']['metric_before']:.3f}; after: "
      + ", ".join(f"{r['method']} {r['metric_mean']:.3f}" for r in comp["rows"]))

# %% [markdown]
# ## 2. What each method learns, against full fine-tuning
#
# The rank bound of each family holds inside the trained model, layer by layer:
# LoRA's $\Delta W$ has rank at most $r$, ABBA's at most $r_1 r_2 = 16$ (twice LoRA's at
# the same budget), while the multiplicative families (HiRA, HUT, SMoA: $W_0 \odot \cdot$)
# and the row-rescaling ones (DoRA, α-LoRA) reach full rank. Full fine-tuning's own
# update is full rank too.

# %%
def deltas_of(method, seed=0):
    cfg = next(c for c in configs if c.method == method and c.seed == seed)
    return R.load_deltas(R.run_dir(OUT, cfg))


from finetune.adapters import layer_config

for method in C.ALL:  # every layer: rank ΔW <= the registry's bound at the layer's config
    meth = theory.get_method(method)
    for path, (d, w0) in deltas_of(method).items():
        m, n = d.shape
        bound = meth.rank_bound(m, n, AN.ranks(w0)[0], layer_config(meth, m, n, RANK))
        assert AN.ranks(d)[0] <= bound, (method, path, AN.ranks(d)[0], bound)
lora_rank, abba_rank = by["lora"]["numerical_rank"], by["abba"]["numerical_rank"]
assert lora_rank <= RANK < abba_rank, (lora_rank, abba_rank)
assert by["full"]["numerical_rank"] > 4 * RANK and by["hira"]["numerical_rank"] > 4 * RANK
print(f"mean numerical rank of ΔW: LoRA {lora_rank:.1f}, ABBA {abba_rank:.1f}, "
      f"HiRA {by['hira']['numerical_rank']:.1f}, full FT {by['full']['numerical_rank']:.1f}")

# %% [markdown]
# Rank is not direction. The cosine between an adapter's $\Delta W$ and full
# fine-tuning's (same seed), and the overlap of their top-8 singular subspaces, say
# how much of full fine-tuning's update an adapter reproduces. The reference is full
# fine-tuning against itself at another seed (another data order): that is how
# reproducible the target is. Every adapter stays well below it: adapters find
# *other* solutions of the task, not a compressed copy of full fine-tuning's.

# %%
fig, ax = plt.subplots(figsize=(7, 4))
adapters = [r for r in comp["rows"] if r["method"] != "full"]
x = np.arange(len(adapters))
ax.bar(x - 0.2, [r["cosine"] for r in adapters], 0.4, label="cosine with full FT's ΔW")
ax.bar(x + 0.2, [r["overlap"] for r in adapters], 0.4, label=f"top-{RANK} subspace overlap")
ax.axhline(by["full"]["cosine"], color="k", ls="--", lw=1, label="full FT vs full FT (other seed)")
ax.set_xticks(x, [r["method"] for r in adapters], rotation=45, ha="right")
ax.legend(fontsize=8)
ax.set_title("alignment of the learned update with full fine-tuning's")
fig.tight_layout()
plt.show()

assert by["full"]["cosine"] > 0.9
assert all(r["cosine"] < by["full"]["cosine"] - 0.2 for r in adapters)
assert all(-1 <= r["cosine"] <= 1 and 0 <= r["overlap"] <= 1 for r in adapters)

# %% [markdown]
# ## 3. Expressing full fine-tuning's update vs fine-tuning well
#
# For each method, `reconstruction.fit` finds the best update of that family, at the
# same budget, for full fine-tuning's $\Delta W_f$ (seed 0), layer by layer. LoRA's is
# the truncated SVD, so its error is exactly the Eckart-Young tail
# $\sum_{k>r}\sigma_k^2/\sum_k\sigma_k^2$: a check of the whole pipeline.

# %%
from reconstruction.fit import lora_optimum

full0 = deltas_of("full")
ey = np.mean([float(lora_optimum(d.double(), RANK)) for d, _ in full0.values()])
assert abs(by["lora"]["reconstruction_error"] - ey) < 1e-4 * max(ey, 1e-6)
print(f"LoRA's reconstruction error of full FT's ΔW: {by['lora']['reconstruction_error']:.4f} "
      f"(Eckart-Young tail {ey:.4f})")

ours = [r for r in comp["rows"] if r["method"] != "full"]
fig, ax = plt.subplots(figsize=(6, 4))
for r in ours:
    ax.errorbar(r["reconstruction_error"], r["metric_mean"],
                yerr=r["metric_sd"] if math.isfinite(r["metric_sd"]) else 0, fmt="o", capsize=3)
    ax.annotate(r["method"], (r["reconstruction_error"], r["metric_mean"]), fontsize=8,
                xytext=(3, 3), textcoords="offset points")
ax.set_xlabel("reconstruction error of full FT's ΔW at the same budget")
ax.set_ylabel("held-out accuracy (mean ± sd)")
fig.tight_layout()
plt.show()
corr = comp["correlation"]["reconstruction_vs_metric"]
print(f"Spearman ρ = {corr['rho']:+.3f}, p = {corr['p']:.3g}, n = {corr['n']}")

# %% [markdown]
# The rank correlation is computed over the twelve methods. At this size it is not a
# positive one: the methods that can express full fine-tuning's update best
# (LoRA, ABBA, LoHa, DoRA, α-LoRA: errors of a few percent) do not fine-tune better
# than those that express it worst (VeRA: almost nothing of it; PMSS, LoKr). On a task
# this easy every method reaches the same accuracy by a different update, so
# "expressivity" in the reconstruction sense does not decide the outcome.

# %%
assert corr["n"] == len(ours) == 12
assert not (corr["rho"] > 0.5 and corr["p"] < 0.05), corr  # no strong positive link here
worst = max(ours, key=lambda r: r["reconstruction_error"])
assert worst["metric_mean"] >= by["lora"]["metric_mean"] - 0.05, worst["method"]

# %% [markdown]
# ## The real model: MiniLM on movie reviews, 3 seeds of every row
#
# The digits toy answers in a minute; the same questions on a real encoder take
# hours of CPU. `python -m finetune.compare --model minilm --task movie --methods all
# --rank 8 --seeds 3 --impl both --steps 100 --eval-every 50` trained all twelve
# methods, PEFT's rows where PEFT has the method, and full fine-tuning; the run records
# and the fits of full fine-tuning's ΔW are kept (without their tensors) in
# `records/finetune`, and this section reads the table rebuilt from them. Set
# `ADAPTERS_COMPARISON` to any other comparison's JSON to read that one instead (then
# only the checks that hold for every comparison run).

# %%
ROOT = Path.cwd() if (Path.cwd() / "records").is_dir() else Path.cwd().parent
kept = ROOT / "records/finetune/minilm/movie/table.json"
path = Path(os.environ.get("ADAPTERS_COMPARISON") or kept)
full_comp = C.read_comparison(path) if path.is_file() else None
if full_comp is None:
    print(f"no comparison at {path}: nothing more to read")
else:
    print(C.format_table(full_comp))
    done = [r for r in full_comp["rows"] if "metric_mean" in r]
    fb = {r["label"]: r for r in done}
    assert "full" in fb and "lora" in fb
    # the budget contract, and the rank bounds, on the real model too
    assert all(r["trainable_params"] <= fb["lora"]["trainable_params"]
               for r in done if r["method"] != "full" and r["impl"] == "ours")
    assert fb["lora"]["numerical_rank"] <= full_comp["rank"] + 1e-9
    if "abba" in fb:
        assert fb["abba"]["numerical_rank"] <= (full_comp["rank"] // 2) ** 2 + 1e-9
    # fine-tuning helps every method that ran
    better = 1 if full_comp.get("higher_is_better", True) else -1
    assert all(better * (r["metric_mean"] - r["metric_before"]) > 0 for r in done)

# %% [markdown]
# What the kept MiniLM table says (each claim asserted below, on its three seeds):
#
# - **Our trainer is not the variable.** Where PEFT has the method, its row and ours
#   agree within two standard deviations of the seeds (LoRA 0.814 / 0.814).
# - **At the common learning rate (1e-3, 100 steps) the Hadamard-product adapters
#   trail LoRA** by more than 3 accuracy points (ABBA, HiRA, LoHa, SMoA), although
#   ABBA's and LoHa's learned updates have twice LoRA's rank (16 against 8). The
#   README shows the gap shrinking at 4e-3: a product of small factors moves slowly
#   at first, so this is partly a statement about the learning rate.
# - **Expressing full fine-tuning's update does not predict fine-tuning.** LoRA
#   expresses $\Delta W_f$ better than ABBA at this budget (its spectrum decays fast,
#   so the truncated SVD wins), and across the twelve methods the Spearman correlation
#   between reconstruction error and accuracy is not significant.

# %%
if full_comp is not None and path == kept:
    assert all(r["seeds"] == [0, 1, 2] for r in done) and len(done) == 20
    for m in ("lora", "hira", "loha", "dora", "miss"):
        ours_r, peft_r = fb[m], fb[f"{m} (PEFT)"]
        assert abs(ours_r["metric_mean"] - peft_r["metric_mean"]) \
            <= 2 * max(ours_r["metric_sd"], peft_r["metric_sd"]), m
    for m in ("abba", "hira", "loha", "smoa"):
        assert fb[m]["metric_mean"] < fb["lora"]["metric_mean"] - 0.03, m
    assert fb["abba"]["numerical_rank"] == 2 * fb["lora"]["numerical_rank"]
    assert fb["lora"]["reconstruction_error"] < fb["abba"]["reconstruction_error"]
    rc = full_comp["correlation"]["reconstruction_vs_metric"]
    assert rc["n"] == 12 and rc["p"] > 0.05, rc

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in done:
        ax.errorbar(r["trainable_params"], r["metric_mean"], yerr=r["metric_sd"],
                    fmt="s" if r["impl"] == "peft" else "o", capsize=3,
                    mfc="none" if r["impl"] == "peft" else None)
        ax.annotate(r["label"], (r["trainable_params"], r["metric_mean"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("held-out accuracy (3 seeds)")
    ax.set_title("MiniLM on movie reviews at the budget of rank-8 LoRA (squares: PEFT)")
    fig.tight_layout()
    plt.show()

# %%
print(f"notebook ran in {time.perf_counter() - t0:.0f} s")
