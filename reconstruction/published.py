"""Published reconstruction numbers, kept in one place.

Singhal et al., "ABBA: Highly Expressive Hadamard Product Adaptation for Large
Language Models", 2025 (arXiv:2505.14238), Figure 2: relative squared Frobenius
error ‖M − ΔW‖_F² / ‖M‖_F² of ABBA on four 1000×1000 targets, x-axis labelled
"LoRA r / ABBA r1 = r2 = r/2", r = 8, 16, ..., 72.

The ABBA values below are read off the plot at its two ends (r = 8 and r = 72),
so they carry the precision of a reading (about ±0.01). LoRA's curve in that
figure is exact (truncated SVD), e.g. 1 − r/1000 on the orthogonal target and
about 0.243 at r = 8 on the U[0,1) target; we recompute it, never copy it.

Note (DESIGN §4): an Adam or ALS fit here reaches these ABBA values only with
r1 = r2 = r (twice LoRA's parameters, as the paper's public code does), not with
the stated r1 = r2 = r/2.
"""

from __future__ import annotations

#: the figure's matrix size and ranks
FIG2_SIZE = 1000
FIG2_RANKS = (8, 16, 24, 32, 40, 48, 56, 64, 72)
#: target kind names, in the panel order of the figure (names of ``reconstruction.targets``)
FIG2_TARGETS = ("orthogonal", "lowrank", "sparse", "random")

#: ABBA, read off Fig. 2: {target: {r: relative error}}
ABBA_FIG2: dict[str, dict[int, float]] = {
    "orthogonal": {8: 0.95, 72: 0.41},
    "lowrank": {8: 0.84, 72: 0.27},
    "sparse": {8: 0.85, 72: 0.20},
    "random": {8: 0.234, 72: 0.12},
}

#: panel titles
TARGET_TITLES = {
    "orthogonal": "orthogonal (QR of Gaussian)",
    "lowrank": "low-rank (rank 128, flat spectrum)",
    "sparse": "sparse (10% density, U[0,1])",
    "random": "random U[0,1)",
}


def lora_orthogonal(r: int, n: int = FIG2_SIZE) -> float:
    """LoRA's exact error on an n×n orthogonal target: every σ = 1, so 1 − r/n."""
    return 1.0 - r / n
