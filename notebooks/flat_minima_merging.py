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
# # Flat minima and modular merging
#
# Two questions about adapters that are not about their parameterization:
#
# 1. **Training for flatness.** SAM (Foret et al., 2021) steps with the gradient at the
#    worst point of a ball of radius ρ; BSAM (Deng et al., 2024) adds the gradient at a
#    *best* point of the ball (min-sharpness) and so takes three gradients per step;
#    Flat-LoRA (Li et al., ICML 2025) asks for flatness of the *merged* weight
#    $W' = W_0 + \Delta W$ in the full space, not of the low-rank factors, and pays for it
#    with one random perturbation per step instead of an extra gradient:
#    $E_{ij} \sim \mathcal N(0, \sigma_i^2)$, $\sigma_i = f(t)\,\rho\,\lVert W'_{i,:}\rVert/\sqrt{d_{in}}$,
#    $f(t) = \tfrac12(1-\cos \pi t/T)$.
# 2. **Merging.** LoRAs trained on different tasks are combined into one update. The sum
#    of their updates $S = \sum_t \Delta W_t$ is the reference; at rank $K$ no merge can be
#    closer to $S$ than its truncated SVD (Eckart–Young). LoRA-LEGO (Zhao et al., ICLR 2025)
#    clusters the rank-one units $[b_i; a_i]$ of all LoRAs into $K$ centroids.
#
# Everything here runs at toy size in about a minute (the digits MLP and the tiny GPT-2).
# The MiniLM measurements (3 seeds per rule, LoRA and ABBA at rank 8, and the four VADER
# corpora merged at $K = 8, 32$) are made by `python -m finetune.run --optimizer ...`,
# `python -m finetune.sharpness RUN...` and `python -m finetune.merge --runs ...`.

# %%
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from finetune import adapters as A
from finetune import merge as M
from finetune import runs as R
from finetune import sharpness as S
from finetune.data import have_corpora
from finetune.optim import RULES
from finetune.train import RunConfig, train

torch.set_num_threads(1)
t_start = time.perf_counter()
work = Path(tempfile.mkdtemp(prefix="flat-merge-"))
OPTIMIZERS = ["adamw", "sam", "bsam", "flat-lora"]

# %% [markdown]
# ## 1. What a step costs
#
# Each rule calls the closure (forward + backward of the batch) a fixed number of times:
# AdamW once, SAM twice, BSAM three times, Flat-LoRA once. We count the calls on a real
# training run of the digits MLP with LoRA (rank 4) rather than trusting the class
# attribute; the wall-clock ratio is printed for information only (it depends on the
# model: on the tiny MLP Flat-LoRA's noise and its extra matmul are not negligible;
# `python -m finetune.optim.timing --model minilm` measures it on MiniLM).

# %%
from finetune import tasks as T
from finetune.optim import make_rule


def count_passes(rule_name, steps=20):
    task = T.get_task("mlp", "digits", seed=0)
    model = task.model
    A.inject(model, "lora", rank=4, targets=task.targets, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rule = make_rule(rule_name, opt, model, total_steps=steps)
    calls = 0
    batch = task.batch(task.train_idx[:64])

    def closure():
        nonlocal calls
        calls += 1
        loss = task.loss(model, batch)
        loss.backward()
        return loss.detach()

    rule.step(closure, 1)  # warm-up, not timed
    calls, t0 = 0, time.perf_counter()
    for k in range(steps):
        rule.step(closure, k)
    return calls / steps, (time.perf_counter() - t0) / steps


passes = {o: count_passes(o) for o in OPTIMIZERS}
for o, (p, sec) in passes.items():
    print(f"{o:<10} {p:.0f} forward-backward per step, {1e3 * sec:.2f} ms/step "
          f"({sec / passes['adamw'][1]:.1f}x adamw)")
assert {o: p for o, (p, _) in passes.items()} == {"adamw": 1, "sam": 2, "bsam": 3, "flat-lora": 1}
assert all(RULES[o].gradient_evaluations == p for o, (p, _) in passes.items())

# %% [markdown]
# ## 2. Training with each rule, and W0 untouched
#
# Four LoRA runs of the digits transfer (pre-trained on digits 0–7, fine-tuned on 8 vs 9),
# identical but for the step rule. Flat-LoRA adds its noise through the adapted layer's
# `perturbation` (the forward computes $x(W_0+\Delta W+E)^\top$), so $W_0$ is never
# written: we check it bit for bit against a fresh pre-trained model.

# %%
digits_runs = {}
for o in OPTIMIZERS:
    cfg = RunConfig(model="mlp", task="digits", method="lora", rank=4, steps=150, optimizer=o,
                    seed=0)
    rec = train(cfg, return_model=True)
    d = work / "mlp" / cfg.name
    R.save_run(d, rec, rec["model"])
    digits_runs[o] = d
    print(f"{o:<10} accuracy {rec['metric_before']:.3f} -> {rec['metric']:.3f}, "
          f"final train loss {rec['final_train_loss']:.4f}")

fresh = T.get_task("mlp", "digits", seed=0).model
model_flat, _ = R.load_model(digits_runs["flat-lora"])
for path, lay in A.adapted_layers(model_flat).items():
    assert torch.equal(lay.w0, fresh.get_submodule(path).weight), path
print("W0 after Flat-LoRA training equals the pre-trained weight, bit for bit")

# %% [markdown]
# ## 3. Sharpness of what each rule found
#
# Two measures of the training loss at the end of each run (`finetune.sharpness`):
#
# - $S_\rho = \mathbb E_E[L(W'+E)] - L(W')$, each row of each adapted $W'$ moved by exactly
#   $\rho\lVert W'_{i,:}\rVert$ in a random direction (Flat-LoRA's notion, full space);
# - $\lambda_{\max}$ of the Hessian, by power iteration on Hessian-vector products, with
#   respect to the merged weights $W'$ and with respect to the LoRA factors.
#
# First the measures themselves, on a quadratic whose Hessian we know: $\lambda_{\max}$ is
# recovered, and near a minimum $S_\rho \approx \tfrac12\rho^2\,\mathrm{tr}(H)/d_{in}\,\lVert W'\rVert^2$
# grows as $\rho^2$.

# %%
g = torch.Generator().manual_seed(0)
q = torch.randn(12, 12, generator=g, dtype=torch.float64)
H = q @ q.T / 12 + 0.1 * torch.eye(12, dtype=torch.float64)
w = torch.zeros(12, dtype=torch.float64, requires_grad=True)
lam = S.top_hessian_eigenvalue([lambda: 0.5 * w @ H @ w], [w], iters=500, tol=1e-12)
print(f"power iteration {lam['eigenvalue']:.6f} vs eigvalsh {float(torch.linalg.eigvalsh(H)[-1]):.6f}"
      f" ({lam['iterations']} HVPs)")
assert abs(lam["eigenvalue"] - float(torch.linalg.eigvalsh(H)[-1])) < 1e-6

# %%
settings = S.Settings(radius=0.05, samples=16, batches=2, batch=64, hessian_batches=2,
                      iters=30, tol=1e-3)
sharp = {o: S.run_sharpness(d, settings) for o, d in digits_runs.items()}
print(f"{'rule':<10} {'acc':>6} {'S_rho':>10} {'lam_max W':>10} {'lam_max AB':>11}")
for o, s in sharp.items():
    print(f"{o:<10} {s['metric']:>6.3f} {s['random']['increase']:>10.5f} "
          f"{s['hessian_weights']['eigenvalue']:>10.3f} {s['hessian_factors']['eigenvalue']:>11.3f}")

# %% [markdown]
# On this toy, SAM lowers the top eigenvalue in the space it perturbs (the LoRA factors)
# several-fold, but not in the full weight space $W'$, which is the space Flat-LoRA argues
# flatness should be measured in. BSAM at its published radii (ρ_max = ρ_min = 0.05)
# does not leave the 8-vs-9 plateau (training loss ≈ ln 2, chance accuracy) and ends
# where the factor-space curvature is negative: a saddle.

# %%
lam_f = {o: s["hessian_factors"]["eigenvalue"] for o, s in sharp.items()}
lam_w = {o: s["hessian_weights"]["eigenvalue"] for o, s in sharp.items()}
assert lam_f["sam"] < 0.5 * lam_f["adamw"]
assert abs(lam_w["sam"] - lam_w["adamw"]) < 0.1 * lam_w["adamw"]
assert sharp["bsam"]["metric"] < 0.6 and lam_f["bsam"] < 0

# %%
# S_rho is quadratic in rho at small radii (the loss is smooth): doubling rho x4
model_a, task_a = R.load_model(digits_runs["adamw"])
model_a.eval()
losses = S.training_losses(task_a, model_a, 2, 64, seed=0)
sites = S.weight_sites(model_a)
rhos = [0.005, 0.01, 0.02]
incs = [S.expected_loss_increase(losses, sites, r, samples=64, seed=1)["increase"] for r in rhos]
print("S_rho at rho =", rhos, ":", [f"{v:.2e}" for v in incs],
      "ratios", [f"{incs[i + 1] / incs[i]:.2f}" for i in range(2)])
assert all(2.5 < incs[i + 1] / incs[i] < 6 for i in range(2))

# %%
fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
names = list(sharp)
for ax, (key, label) in zip(axes, [("random", r"$S_\rho$, $\rho=0.05$"),
                                   ("hessian_weights", r"$\lambda_{\max}$ w.r.t. $W'$"),
                                   ("hessian_factors", r"$\lambda_{\max}$ w.r.t. $A, B$")]):
    vals = [sharp[n][key]["increase" if key == "random" else "eigenvalue"] for n in names]
    ax.bar(names, vals, color=["0.5", "C0", "C1", "C2"])
    ax.set_title(label)
    ax.tick_params(axis="x", rotation=30)
fig.suptitle("digits MLP, LoRA rank 4: sharpness at the end of training (one seed)")
fig.tight_layout()

# %% [markdown]
# ## 4. Merging four LoRAs
#
# The tiny GPT-2 (2 layers, pre-trained on the NYT corpus) gets one LoRA (rank 4, the
# attention and MLP maps) per VADER corpus. We merge the four by every rule and measure,
# per layer, the error against the summed update $S$ — the SVD optimum at rank $K$ is a
# floor for every merge's best rank-$K$ version — and the held-out loss (nats per
# character) of the merged model on each corpus.

# %%
if have_corpora():
    corpora = ["movie", "amazon", "tweets", "nyt"]
    lm_runs = []
    for c in corpora:
        cfg = RunConfig(model="tiny-gpt2", task=c, method="lora", rank=4, steps=60, seed=0)
        rec = train(cfg, return_model=True)
        d = work / "tiny" / c
        R.save_run(d, rec, rec["model"])
        lm_runs.append(d)
        print(f"{c:<7} held-out loss {rec['metric_before']:.4f} -> {rec['metric']:.4f}")
    ks = [1, 2, 4, 8, 16]
    res = M.merge_runs(lm_runs, list(M.RULES), ks, evaluate=False)
    by = {m["name"]: m["mean"] for m in res["merges"]}
    opt = [by["sum"][f"svd_optimum_{k}"] for k in ks]
    for m in res["merges"]:
        for k in ks:  # Eckart-Young: no rank-K merge beats the truncated SVD of the sum
            assert m["mean"][f"error_at_{k}"] >= m["mean"][f"svd_optimum_{k}"] - 1e-9, m["name"]
    assert all(abs(by[f"svd@{k}"]["error"] - by["sum"][f"svd_optimum_{k}"]) < 1e-6 for k in ks)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(ks, opt, "k-o", label="truncated SVD of the sum (optimum)")
    ax.plot(ks, [by[f"lego@{k}"]["error"] for k in ks], "C2-s", label="LoRA-LEGO")
    ax.plot(ks, [by["ties"][f"error_at_{k}"] for k in ks], "C1--^", label="TIES, best rank K")
    ax.axhline(by["mean"]["error"], color="C0", ls=":", label="mean (full rank)")
    ax.axhline(by["ties"]["error"], color="C1", ls=":", label="TIES (full rank)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (rank of the merged LoRA)")
    ax.set_ylabel(r"$\|M - S\|_F / \|S\|_F$ (mean over layers)")
    ax.set_title(f"4 tiny-GPT-2 LoRAs of rank 4 (pooled rank {res['pooled_rank']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
else:
    print("the VADER corpora are not fetched (python -m finetune.data fetch): section skipped")

# %% [markdown]
# A LoRA merged with itself by LEGO at its own rank comes back unchanged (each cluster
# is a pair of equal units, and both reweightings are then 1); at the pooled rank LEGO
# without reweighting is the plain sum, and with the output reweighting $\sqrt{\bar r/K}$
# the sum scaled down.

# %%
if have_corpora():
    _, units, _ = M.load_units(lm_runs[0])
    for path, (b, a) in list(units.items())[:3]:
        back = M.merge("lego", [(b, a), (b, a)], b.shape[1])
        assert torch.allclose(back, b @ a, rtol=1e-9, atol=1e-12), path
    print("LEGO(LoRA, LoRA) at rank r = LoRA, on", len(units), "layers checked:", 3)
    pooled = [load[1] for load in map(M.load_units, lm_runs)]
    for path in list(units)[:3]:
        us = [u[path] for u in pooled]
        s_sum = M.merge("sum", us, 1)
        kk = sum(b.shape[1] for b, _ in us)
        assert torch.allclose(M.merge("lego", us, kk, lego_reweight="none"), s_sum, atol=1e-10)
        assert torch.allclose(M.merge("lego", us, kk), s_sum * (4 / kk) ** 0.5, atol=1e-10)

    evaluated = M.merge_runs(lm_runs, list(M.RULES), [4, 16])
    rows = ["base"] + [n for n in evaluated["metrics"][f"{corpora[0]}#0"] if n.startswith("single")] \
        + [m["name"] for m in evaluated["merges"]]
    print(f"{'update':<16}" + "".join(f"{c:>8}" for c in corpora) + f"{'mean':>8}")
    table = {}
    for n in rows:
        vals = [evaluated["metrics"][f"{c}#{i}"][n] for i, c in enumerate(corpora)]
        table[n] = vals
        print(f"{n.replace('single:', 'only '):<16}" + "".join(f"{v:>8.4f}" for v in vals)
              + f"{np.mean(vals):>8.4f}")
    # each LoRA folded into W0 scores what its own run recorded on its own corpus
    for i, c in enumerate(corpora):
        assert abs(table[f"single:{c}#{i}"][i] - evaluated["recorded"][f"{c}#{i}"]) < 1e-3

# %% [markdown]
# Reading the table: lower is better (held-out loss). The summed update is what task
# arithmetic would deploy; the SVD and LEGO rows are LoRAs of rank $K$. On MiniLM the same
# table is `python -m finetune.merge --runs RUN_movie RUN_amazon RUN_tweets RUN_nyt --rank 8,32`.

# %%
print(f"notebook ran in {time.perf_counter() - t_start:.0f} s")
