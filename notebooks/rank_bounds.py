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
# # Rank bounds of PEFT updates: what a parameter buys
#
# A LoRA update $\Delta W = BA$ with $B \in \mathbb{R}^{m\times r}$, $A \in \mathbb{R}^{r\times n}$
# costs $r(m+n)$ parameters and has rank at most $r$. Hadamard-product adapters spend the
# same parameters differently:
#
# | method | $\Delta W$ | rank bound |
# |---|---|---|
# | LoRA | $BA$ | $r$ |
# | ABBA / LoHa | $(B_1A_1)\odot(B_2A_2)$ | $r_1 r_2$ |
# | HiRA | $W_0\odot(BA)$ | $r\cdot\operatorname{rank}W_0$ |
#
# all capped at $\min(m, n)$. The one fact behind the table:
# $\operatorname{rank}(X\odot Y)\le \operatorname{rank}X\cdot\operatorname{rank}Y$,
# because of the face-splitting (Khatri-Rao) identity
# $$(B_1A_1)\odot(B_2A_2) = (B_1\odot_r B_2)\,(A_1^\top\odot_r A_2^\top)^\top,$$
# a product through an inner dimension of $r_1 r_2$.
#
# This notebook measures those ranks, shows the one trap (identical factors), prints the
# budget table of every registered method, and plots rank against budget. It runs in a
# few seconds on a CPU.

# %%
import matplotlib.pyplot as plt
import torch

import theory
from theory.khatri_rao import hadamard_lowrank_factors
from theory.spectra import numerical_rank
from theory.table import budget_table, format_table

torch.set_num_threads(1)  # small matrices: one thread is fastest
DTYPE = torch.float64  # exact numerical ranks need float64


def low_rank(m, n, r, seed):
    """A random m x n matrix of rank exactly r (generic: Gaussian factors)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g, dtype=DTYPE) @ torch.randn(r, n, generator=g, dtype=DTYPE)


def rank(W):
    return int(numerical_rank(W))


# %% [markdown]
# ## 1. The Hadamard product multiplies ranks
#
# For generic rank-$r_1$ and rank-$r_2$ matrices, the rank of $X\odot Y$ is exactly
# $\min(r_1 r_2, m, n)$: the bound is attained.

# %%
m = n = 64
print(f"{'r1':>3} {'r2':>3} {'rank X⊙Y':>9} {'bound min(r1 r2, 64)':>21}")
for r1, r2 in [(1, 1), (2, 3), (4, 4), (5, 7), (8, 8), (9, 9)]:
    X, Y = low_rank(m, n, r1, seed=r1), low_rank(m, n, r2, seed=100 + r2)
    print(f"{r1:>3} {r2:>3} {rank(X * Y):>9} {min(r1 * r2, m, n):>21}")
    assert rank(X * Y) == min(r1 * r2, m, n)  # the bound, attained

# %% [markdown]
# The identity itself, checked numerically: the Hadamard product of two low-rank products
# equals one product of face-split factors, with inner dimension $r_1 r_2$.

# %%
g = torch.Generator().manual_seed(0)
B1, A1 = torch.randn(m, 3, generator=g, dtype=DTYPE), torch.randn(3, n, generator=g, dtype=DTYPE)
B2, A2 = torch.randn(m, 4, generator=g, dtype=DTYPE), torch.randn(4, n, generator=g, dtype=DTYPE)
L, R = hadamard_lowrank_factors(B1, A1, B2, A2)  # (m, 12), (n, 12)
print("L:", tuple(L.shape), " R:", tuple(R.shape))
gap = float(((B1 @ A1) * (B2 @ A2) - L @ R.mT).abs().max())
print("max |(B1A1)⊙(B2A2) − L Rᵀ| =", gap)
assert L.shape == (m, 12) and R.shape == (n, 12) and gap < 1e-10

# %% [markdown]
# ## 2. The trap: $X \odot X$ has rank at most $r(r+1)/2$, not $r^2$
#
# If both factors are the *same* matrix, row $i$ of $X\odot_r X$ is $x_i\otimes x_i$, a
# symmetric tensor: the entries $x_{ij}x_{ik}$ and $x_{ik}x_{ij}$ coincide, so only
# $r(r+1)/2$ of the $r^2$ columns are distinct. An adapter whose two Hadamard factors are
# tied (or initialised identically and trained symmetrically) loses almost half its rank.

# %%
print(f"{'r':>3} {'rank X⊙X':>9} {'r(r+1)/2':>9} {'rank X⊙Y':>9} {'r²':>5}")
for r in range(1, 9):
    X, Y = low_rank(m, n, r, seed=r), low_rank(m, n, r, seed=50 + r)
    print(f"{r:>3} {rank(X * X):>9} {r * (r + 1) // 2:>9} {rank(X * Y):>9} {min(r * r, m):>5}")
    assert rank(X * X) == r * (r + 1) // 2 and rank(X * Y) == min(r * r, m)

# %% [markdown]
# ## 3. Every method at the budget of rank-16 LoRA, on a 4096 x 4096 weight
#
# Budget matching is the only fair comparison: each method gets the configuration whose
# parameter count is the largest not above $16\,(4096+4096) = 131{,}072$. The same table is
# printed by `python -m theory.table --shape 4096 4096 --rank 16`.

# %%
rows = budget_table(4096, 4096, 16)
print(format_table(rows, 4096, 4096, 16))
budget = 16 * (4096 + 4096)
bound = {row["method"]: row["rank_bound"] for row in rows}
assert all(row["n_params"] <= budget for row in rows if row["n_params"] is not None)
assert bound["lora"] == 16 and bound["abba"] == 8 * 8 and bound["hira"] == 4096

# %% [markdown]
# The bounds assume a full-rank $W_0$. Methods that modulate $W_0$ (HiRA, SMoA, HUT) inherit
# its rank: with a rank-64 $W_0$ their bound drops.

# %%
for row in budget_table(4096, 4096, 16, rank_w0=64):
    if row["method"] in ("hira", "smoa", "hut", "pmss", "dora", "alpha_lora"):
        print(f"{row['method']:<11} rank bound {row['rank_bound']:>5} with rank W0 = 64")
    if row["method"] in ("hira", "smoa", "hut"):  # they inherit the rank of W0
        assert row["rank_bound"] < bound[row["method"]]

# %% [markdown]
# ## 4. Measured rank against budget
#
# At a 96 x 96 weight, for LoRA budgets $r = 1..24$: LoRA reaches $r$, ABBA with
# $r_1 = r_2 = r/2$ reaches $\min(r^2/4, 96)$, and HiRA reaches $\min(r\cdot\operatorname{rank}W_0, 96)$:
# full rank at once for a full-rank $W_0$, but only $r\cdot 4$ for a rank-4 $W_0$.
# Every point is the numerical rank of $\Delta W$ at a random (generic) point of the
# parameterization.

# %%
m = n = 96
budgets = list(range(2, 25, 2))
w0_full = low_rank(m, n, m, seed=1)
w0_low = low_rank(m, n, 4, seed=2)
curves = {"lora": [], "abba": [], "hira (full-rank W0)": [], "hira (rank-4 W0)": []}
for r in budgets:
    for label, name, w0 in [("lora", "lora", w0_full), ("abba", "abba", w0_full),
                            ("hira (full-rank W0)", "hira", w0_full), ("hira (rank-4 W0)", "hira", w0_low)]:
        meth = theory.get_method(name)
        cfg = meth.config_for_rank(m, n, r)
        params = meth.init(w0, cfg, generator=r, scheme="gaussian")
        curves[label].append(rank(meth.delta(params, w0, cfg)))

fig, ax = plt.subplots(figsize=(6, 4))
for (label, ranks), marker in zip(curves.items(), "osD^"):
    ax.plot(budgets, ranks, marker=marker, label=label)
ax.plot(budgets, [min(r * r // 4, m) for r in budgets], "k:", lw=1, label="bound r²/4 (ABBA)")
ax.axhline(min(m, n), color="grey", lw=0.8)
ax.set_xlabel("budget: LoRA rank r  (ABBA r1 = r2 = r/2)")
ax.set_ylabel("numerical rank of ΔW")
ax.set_title(f"Rank at equal parameter budget, {m}x{n}")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %%
for label, ranks in curves.items():
    print(f"{label:<21}", ranks)
# every measured rank is its bound: r, min(r²/4, 96), min(r · rank W0, 96)
assert curves["lora"] == budgets
assert curves["abba"] == [min((r // 2) ** 2, m) for r in budgets]
assert curves["hira (full-rank W0)"] == [m] * len(budgets)
assert curves["hira (rank-4 W0)"] == [min(4 * r, m) for r in budgets]

# %% [markdown]
# ## 5. Rank is not reach
#
# Full algebraic rank does not mean every matrix is reachable: the image of
# $(B_1, A_1, B_2, A_2)\mapsto (B_1A_1)\odot(B_2A_2)$ is a thin set of dimension at most
# $(r_1+r_2)(m+n)$, far below $mn$. Compare methods by the *error* they reach on a target
# (`python -m reconstruction.run`), and use the rank bound only as a ceiling.

# %%
abba = theory.get_method("abba")
cfg = abba.config_for_rank(m, n, 16)  # r1 = r2 = 8: rank up to 64 ...
print(f"ABBA {cfg}: rank bound {abba.rank_bound(m, n, m, cfg)}, at most "
      f"{abba.n_params(m, n, cfg):,} free parameters for the {m * n:,} entries of a {m}x{n} matrix")
assert abba.rank_bound(m, n, m, cfg) == 64 and abba.n_params(m, n, cfg) < m * n / 2
