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
# # α-LoRA in random-matrix theory: derivation, then theory against simulation
#
# α-LoRA rescales the frozen weights before adding the low-rank update,
# $W' = \mathrm{diag}(\alpha)\,W_0 + sBA$. This notebook studies the simplest model
# of that idea (DESIGN §5): a linear classifier trained on a large *source* task is
# reused, scaled by $\alpha$, as the starting point of a ridge fit on a small
# *target* task. Every formula is derived here, then compared with a Monte Carlo
# simulation of exactly the same setting (`rmt.simulate`), in the style of Couillet
# & Liao's *Random Matrix Methods for Machine Learning* (RMT4ML). It runs in well
# under a minute on a laptop CPU.
#
# ## 1. The setting
#
# * Data $x = y\mu + z$, $z\sim\mathcal N(0, I_p)$, $y=\pm1$ balanced.
# * Source: mean $\mu$, $N$ samples $\tilde X\in\mathbb R^{p\times N}$.
#   Target: mean $\mu_\beta = \beta\mu + \sqrt{1-\beta^2}\,\mu_\perp$ ($\mu_\perp\perp\mu$),
#   $n$ samples $X\in\mathbb R^{p\times n}$; so $\|\mu_\beta\|^2 = \beta^2\|\mu\|^2 + (1-\beta^2)\|\mu_\perp\|^2$
#   and $\mu^\top\mu_\beta = \beta\|\mu\|^2$.
# * $\eta = p/n$, $\tilde\eta = p/N$, all three large.
# * Source ridge $\tilde w = (\tilde X\tilde X^\top/N + \tilde\gamma I)^{-1}\tilde X\tilde y/N$.
# * Fine-tuning with a scaled base: $w_\alpha = \alpha\tilde w + a$ with $a$ minimising
#   $\frac1n\|y - X^\top(\alpha\tilde w + a)\|^2 + \gamma\|a\|^2$, i.e.
#   $$w_\alpha = \frac{QXy}{n} + \alpha\gamma Q\tilde w,\qquad Q = \Big(\frac{XX^\top}{n}+\gamma I\Big)^{-1}. \tag{1}$$
#   $\alpha=1$ is plain fine-tuning, $\alpha=0$ ignores the source.
#
# On a fresh target point, $g = w_\alpha^\top x \mid y \sim \mathcal N(y\,w_\alpha^\top\mu_\beta,\ \|w_\alpha\|^2)$
# given the training data, so the test accuracy of $\mathrm{sign}(g)$ is **exactly**
# $\Phi(w_\alpha^\top\mu_\beta/\|w_\alpha\|)$. Both numbers concentrate as $p,n,N\to\infty$;
# we need their limits.
#
# ## 2. Derivation
#
# **Resolvent.** With $C = \mathbb E[xx^\top] = I + \mu_t\mu_t^\top$ ($\mu_t$ the target mean),
# $Q$ has the deterministic equivalent $\bar Q = (C/(1+\delta) + \gamma I)^{-1}$, where
# $\delta = \frac1n\operatorname{tr} C\bar Q$ is, to leading order, the positive root of
# $$\gamma\delta^2 + (1+\gamma-\eta)\delta - \eta = 0. \tag{2}$$
# With $\kappa = 1+\gamma(1+\delta)$ and $\lambda = \|\mu_t\|^2 + \kappa$:
# $\bar Q = \frac{1+\delta}{\kappa}\big(I - \mu_t\mu_t^\top/\lambda\big)$.
#
# **Data term.** Sherman–Morrison gives $Qx_i = Q_{-i}x_i/(1 + x_i^\top Q_{-i}x_i/n)$ and
# $x_i^\top Q_{-i}x_i/n\to\delta$; since $y_ix_i = \mu_t + y_iz_i$,
# $$\mathbb E\Big[\frac{QXy}{n}\Big] \simeq \frac{\bar Q\mu_t}{1+\delta} = \frac{\mu_t}{\lambda}. \tag{3}$$
#
# **First-order quantities** for a fixed $\tilde w$ (independent of $X$), with
# $c=\tilde w^\top\mu_t$, $W=\|\tilde w\|^2$, $M=\|\mu_t\|^2$:
# $$B(\gamma) = \tilde w^\top\frac{QXy}{n}\simeq\frac{c}{\lambda},\quad
#   A(\gamma) = \tilde w^\top Q\tilde w \simeq \frac{1+\delta}{\kappa}\Big(W - \frac{c^2}{\lambda}\Big),\quad
#   C(\gamma) = \frac{y^\top X^\top QXy}{n^2}\simeq\frac{\delta + M/\lambda}{1+\delta}. \tag{4}$$
# For $C$, write $y_ix_i^\top QXy/n = \big(d_i + y_ix_i^\top Q_{-i}X_{-i}y_{-i}/n\big)/(1+d_i)$ and apply (3)
# to the leave-one-out vector.
#
# **Second-order quantities by differentiation.** $\partial_\gamma Q = -Q^2$, and deterministic
# equivalents of analytic functions of $\gamma$ can be differentiated, so
# $\|QXy/n\|^2\simeq -C'(\gamma)$, $\tilde w^\top Q^2Xy/n\simeq -B'(\gamma)$,
# $\tilde w^\top Q^2\tilde w\simeq -A'(\gamma)$, with $\delta' = -\delta(1+\delta)/(2\gamma\delta+1+\gamma-\eta)$ from (2).
#
# **Mean and variance of the score** (given $y=+1$):
# $$m(\alpha) = \frac{M + \alpha\gamma(1+\delta)c}{\lambda} = a + b\alpha,\qquad
#   \sigma^2(\alpha) = V_0 + 2\alpha V_1 + \alpha^2V_2,$$
# $$V_0 = -C'(\gamma),\quad V_1 = -\gamma B'(\gamma),\quad V_2 = -\gamma^2A'(\gamma). \tag{5}$$
# Accuracy $\Phi(m/\sigma)$ — with its sign: below ½ when the mean score is negative.
#
# **Optimum.** $m$ is affine and $\sigma^2$ quadratic in α, so $\frac{d}{d\alpha}\frac{m}{\sigma}=0$ is linear:
# $$\alpha^* = \frac{aV_1 - bV_0}{bV_1 - aV_2},\qquad \bar\alpha = -\frac ab\ \ (\text{accuracy } \tfrac12). \tag{6}$$
#
# **The source vector** is (1) at α = 0 on the source task, so (3)–(5) with
# $(\tilde\eta,\tilde\gamma,\|\mu\|)$ give $\tilde w^\top\mu_\beta\to\beta\|\mu\|^2/\tilde\lambda$ and
# $\|\tilde w\|^2\to -\tilde C'(\tilde\gamma)$. Expanded, with $\tilde h = 1-\tilde\eta/(1+\tilde\gamma(1+\tilde\delta))^2$,
# $$\lim\|\tilde w\|^2 = \frac1{\tilde h}\Big[\frac{\|\mu\|^2(1+(1-\tilde h)\|\mu\|^2)}{\tilde\lambda^2} + (1-\tilde h)\Big(1-\frac{2\|\mu\|^2}{\tilde\lambda}\Big)\Big]. \tag{7}$$
#
# **Regression variant.** $y = W_t^\top x+\varepsilon\in\mathbb R^k$, $x\sim\mathcal N(0,I_p)$,
# $\varepsilon\sim\mathcal N(0,s^2I_k)$; $W_\alpha = \alpha W_s + \arg\min_A \frac1n\|Y-X^\top(\alpha W_s+A)\|_F^2+\gamma\|A\|_F^2
# = QXY/n + \alpha\gamma QW_s$, so $W_\alpha - W_t = -\gamma Q(W_t-\alpha W_s) + QXE/n$ and, with $\bar Q = (\delta/\eta)I$,
# $$R(\alpha) = \mathbb E\|W_\alpha^\top x - y\|^2 \simeq \gamma^2\Big(-\frac{\delta'}{\eta}\Big)\|W_t-\alpha W_s\|_F^2 + ks^2(\delta+\gamma\delta') + ks^2, \tag{8}$$
# minimised at $\alpha^* = \langle W_t,W_s\rangle_F/\|W_s\|_F^2$.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch

from rmt import simulate as sim
from rmt import theory
from rmt.theory import Setting

torch.set_num_threads(2)

# %% [markdown]
# ## 3. The scalar δ: $\frac1n\operatorname{tr}Q$ for pure noise against the root of (2)

# %%
p, n = 300, 150
g = torch.Generator().manual_seed(0)
Z = torch.randn(p, n, generator=g, dtype=torch.float64)
ev = torch.linalg.eigvalsh(Z @ Z.T / n)  # (p,)
gammas = np.logspace(-2, 1, 30)
emp = [float((1 / (ev + gm)).sum() / n) for gm in gammas]
plt.figure(figsize=(5, 3.2))
plt.loglog(gammas, theory.delta(p / n, gammas), label="δ(η, γ), eq. (2)")
plt.loglog(gammas, emp, "o", ms=3, label="(1/n) tr Q, one draw")
plt.xlabel("γ")
plt.ylabel("δ")
plt.legend()
plt.title(f"p={p}, n={n}")
plt.show()
# one draw of a 300 x 150 noise matrix already sits on the limit
np.testing.assert_allclose(emp, theory.delta(p / n, gammas), rtol=0.05)

# %% [markdown]
# ## 4. Source norm: eq. (7) against simulation
#
# DESIGN §5 warns that the public reference code's $\lim\|\tilde w\|^2$ looks inexact.
# Our $-\tilde C'(\tilde\gamma)$ equals the $\tilde h$-form (7) to machine precision,
# and both match the simulated $\|\tilde w\|^2$. The reference code's α² term of
# $\mathbb E[g^2]$ uses, in effect, $\|\mu\|^2/\tilde\lambda^2 + (1-\tilde h)(1-2\|\mu\|^2/\tilde\lambda)$
# — (7) without the $1/\tilde h$ factor and the $(1-\tilde h)\|\mu\|^4/\tilde\lambda^2$ term (its own
# pre-trained-model formula does agree with (7)). The two differ little when $\tilde h\approx1$
# ($\tilde\eta$ small or $\tilde\gamma$ large, as in Figure 1: α* 1.645 vs 1.632) and a lot
# near $\tilde\eta = 1$ with a small ridge:

# %%
def reference_code_w_norm2(s):
    M = s.mu_norm ** 2
    d = theory.delta(s.eta_src, s.gamma_src)
    h = 1 - s.eta_src / (1 + s.gamma_src * (1 + d)) ** 2
    lam = M + 1 + s.gamma_src * (1 + d)
    return M / lam ** 2 + (1 - h) * (1 - 2 * M / lam)


for s in (Setting(5000, 40, 1000, 0.8, 0.8, 0.5, 5.0, 0.1),
          Setting(2000, 200, 200, 1.0, 1.0, 0.5, 1.0, 1.0),
          Setting(300, 100, 400, 1.5, 1.0, 0.7, 0.5, 0.5),
          Setting(300, 40, 300, 1.0, 1.0, 0.5, 0.5, 1.0)):
    st = sim.simulate_stats(s, trials=16, seed=1)
    se = st.w_norm2.std(ddof=1) / np.sqrt(st.trials)
    print(f"p={s.p:5d} N={s.N:5d} γ̃={s.gamma_src}:  -C'(γ̃) = {theory.source_stats(s)['w_norm2']:.5f}"
          f"   eq.(7) = {theory.design_w_norm2(s):.5f}   simulated = {st.w_norm2.mean():.5f}"
          f" ± {se:.5f}   reference-code term = {reference_code_w_norm2(s):.5f}")
    limit = theory.source_stats(s)["w_norm2"]
    assert abs(limit - theory.design_w_norm2(s)) <= 1e-10 * limit  # the two forms agree
    assert abs(st.w_norm2.mean() - limit) <= 4 * se + 0.02 * limit  # and match simulation
ref = reference_code_w_norm2(s)  # the last setting: η̃ = 1, small ridge
assert abs(ref - limit) > 0.2 * limit  # there the reference code's term is far off

# %% [markdown]
# ## 5. Accuracy against α (the paper's Figure 1 setting)
#
# Lines: $\Phi(m(\alpha)/\sigma(\alpha))$. Markers: Monte Carlo of the exact conditional
# accuracy, mean ± s.e. Stars: $\alpha^*$ (published ≈ 1.64 / 4.1 / 7.5).

# %%
base = Setting(N=5000, n=40, p=1000, mu_norm=0.8, mu_perp_norm=0.8, beta=0.5,
               gamma_src=5.0, gamma=0.1)
betas = (0.2, 0.5, 0.9)
alpha = np.linspace(-10, 10, 401)
alpha_sim = np.linspace(-10, 10, 11)
stats = sim.simulate_stats_betas(base, betas, trials=10, seed=0)
published = {0.2: 1.64, 0.5: 4.1, 0.9: 7.5}  # the paper's α*, read off its Figure 1

plt.figure(figsize=(6.5, 4))
for beta, st, c in zip(betas, stats, ("C0", "C1", "C2")):
    s = base.replace(beta=beta)
    a_star = theory.alpha_star(s)
    plt.plot(alpha, theory.accuracy(s, alpha), c, label=f"β={beta}: α*={a_star:.2f}")
    acc = st.accuracy(alpha_sim)
    se = acc.std(0, ddof=1) / np.sqrt(acc.shape[0])
    plt.errorbar(alpha_sim, acc.mean(0), se, fmt="o", color=c, ms=3, capsize=2)
    # theory within Monte Carlo error (3 s.e., plus 0.01 for the finite size), α* as published
    assert (np.abs(acc.mean(0) - theory.accuracy(s, alpha_sim)) <= 3 * se + 0.01).all(), beta
    assert abs(a_star - published[beta]) <= 0.02 * published[beta], (beta, a_star)
    plt.plot(a_star, theory.accuracy(s, a_star), "*", color=c, ms=12, mec="k")
plt.axhline(0.5, color="gray", lw=0.5)
plt.xlabel("α")
plt.ylabel("accuracy")
plt.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 6. The score is Gaussian with the predicted moments

# %%
s = Setting(2000, 200, 200, 1.0, 1.0, 0.9, 1.0, 1.0)
a = theory.alpha_star(s)
g_, y_ = sim.sample_scores(s, a, n_test=10000, trials=4, seed=0)
m, v = theory.mean_var(s, a)
xs = np.linspace(-4, 4, 300)
plt.figure(figsize=(6, 3.5))
for cls, c in ((1, "C0"), (-1, "C3")):
    plt.hist(g_[:, y_ == cls].ravel(), bins=80, density=True, alpha=0.35, color=c)
    plt.plot(xs, np.exp(-0.5 * (xs - cls * m) ** 2 / v) / np.sqrt(2 * np.pi * v), color=c)
plt.xlabel("g = w_αᵀx")
plt.title(f"α = α* = {a:.2f}: histograms vs N(±m, σ²)")
plt.show()
yg = g_ * y_  # (trials, n_test): the score times the label, N(m, σ²) in the limit
print(f"mean of y·g {yg.mean():.4f} (theory {float(m):.4f}), variance {yg.var():.4f} "
      f"(theory {float(v):.4f})")
assert abs(yg.mean() - m) < 0.1 * m and abs(yg.var() - v) < 0.1 * v

# %% [markdown]
# ## 7. α* against the task similarity β (Figure 2 setting, small p for speed)
#
# Markers: the argmax of the trial-averaged simulated accuracy on a fine α grid.

# %%
plt.figure(figsize=(6, 3.8))
bb = np.linspace(0, 1, 101)
for p, c in ((20, "C1"), (200, "C2"), (2000, "C3")):
    s = Setting(2000, 200, p, 1.0, 1.0, 0.5, 1.0, 1.0)
    plt.plot(bb, [theory.alpha_star(s.replace(beta=b)) for b in bb], c, label=f"p={p}")
    if p <= 200:
        bs = np.array([0.2, 0.5, 0.8])
        for b, st in zip(bs, sim.simulate_stats_betas(s, bs, trials=60, seed=p)):
            th = theory.alpha_star(s.replace(beta=b))
            found = st.alpha_star_grid(np.linspace(th - 2, th + 2, 801))
            plt.plot(b, found, "o", color=c)
            assert abs(found - th) < 0.35 + 0.15 * th, (p, b, found, th)
plt.xlabel("β")
plt.ylabel("α*")
plt.ylim(0, 4.5)
plt.legend()
plt.show()

# %% [markdown]
# ## 8. Any fixed source classifier
#
# Eqs. (4)–(6) only need $\|\mu_t\|^2$, $\tilde w^\top\mu_t$ and $\|\tilde w\|^2$, so they apply to
# any source vector independent of the target data (e.g. one trained on real data).

# %%
p, n, gam = 300, 120, 0.3
gen = torch.Generator().manual_seed(3)
mu_t = torch.randn(p, generator=gen, dtype=torch.float64)
mu_t = 1.2 * mu_t / mu_t.norm()
w = 0.1 * torch.randn(p, generator=gen, dtype=torch.float64) + 0.3 * mu_t
kw = dict(p=p, n=n, gamma=gam, mu_norm2=float(mu_t @ mu_t), w_dot_mu=float(w @ mu_t),
          w_norm2=float(w @ w))
al = np.linspace(-3, 5, 17)
r = sim.simulate_fixed_source(w, mu_t, n, gam, al, trials=60, seed=0)
plt.figure(figsize=(5.5, 3.5))
plt.plot(al, theory.fixed_source_accuracy(al, **kw), label="theory")
plt.errorbar(al, r.accuracy, r.accuracy_se, fmt="o", ms=3, label="simulation")
plt.axvline(theory.fixed_source_alpha_star(**kw), ls=":", color="k", label="α*")
plt.xlabel("α")
plt.ylabel("accuracy")
plt.legend()
plt.show()
gap = np.abs(r.accuracy - theory.fixed_source_accuracy(al, **kw))
assert (gap <= 3 * r.accuracy_se + 0.01).all(), gap.max()

# %% [markdown]
# ## 9. Regression: risk against α, eq. (8)

# %%
p, n, k = 200, 100, 3
Wt = torch.randn(p, k, generator=gen, dtype=torch.float64) / np.sqrt(p)
Ws = 0.6 * Wt + 0.5 * torch.randn(p, k, generator=gen, dtype=torch.float64) / np.sqrt(p)
kw = dict(wt_norm2=float((Wt ** 2).sum()), ws_norm2=float((Ws ** 2).sum()),
          wt_dot_ws=float((Wt * Ws).sum()))
al = np.linspace(-1, 2.5, 15)
rr = sim.simulate_regression(Wt, Ws, n, 0.5, al, noise_var=0.2, trials=40, seed=0)
plt.figure(figsize=(5.5, 3.5))
plt.plot(al, theory.regression_risk(al, p=p, n=n, gamma=0.5, noise_var=0.2, k=k, **kw),
         label="theory (8)")
plt.errorbar(al, rr.risk, rr.risk_se, fmt="o", ms=3, label="simulation")
plt.axvline(theory.regression_alpha_star(**kw), ls=":", color="k", label="α* = ⟨W_t,W_s⟩/‖W_s‖²")
plt.xlabel("α")
plt.ylabel("test risk")
plt.legend(fontsize=8)
plt.show()
th = theory.regression_risk(al, p=p, n=n, gamma=0.5, noise_var=0.2, k=k, **kw)
assert (np.abs(rr.risk - th) <= 4 * rr.risk_se + 0.03 * th).all()
fine = np.linspace(-1, 2.5, 3501)  # α* = ⟨W_t, W_s⟩/‖W_s‖² minimises the risk
risk = theory.regression_risk(fine, p=p, n=n, gamma=0.5, noise_var=0.2, k=k, **kw)
assert abs(fine[np.argmin(risk)] - theory.regression_alpha_star(**kw)) < 2e-3
