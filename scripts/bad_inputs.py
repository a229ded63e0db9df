"""Every command × the bad values a user could give it: the exit status, the number of
stderr lines, the first of them, and whether a traceback appeared. One process: each
``main(argv)`` is called in turn (every value is checked before any work, so each row
takes well under a second after the imports); a command that starts working instead of
refusing is stopped after ``--limit`` seconds and shows up as ``ran``.

    python scripts/bad_inputs.py                 # the markdown table on stdout
    python scripts/bad_inputs.py --only finetune # the commands whose module starts so

Rules that need finished runs (an unknown ``--how`` on real runs, K above the pooled
rank, runs of different models) are in ``tests/test_merge.py``; here the first bad value
a command meets is the one it names. Exit status 1 when any row is not "exit 2 (130 for Ctrl-C), one line, no traceback".
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np

TMP = Path(tempfile.mkdtemp(prefix="bad-inputs-"))
RO = Path("/proc/no-such-folder")  # unwritable, even for root (a chmod-ed folder is not)
NAN_TARGET = TMP / "nan.npy"
np.save(NAN_TARGET, np.full((8, 8), np.nan, dtype=np.float32))
TEXT = TMP / "not-a-matrix.npy"
TEXT.write_text("hello")
MISSING = "/nonexistent/file.safetensors"

R, S, B = "reconstruction.run", "reconstruction.sweep", "reconstruction.bench"
FT = "finetune.run"
CASES: list[tuple[str, list[str]]] = [
    ("theory.table", ["--shape", "0", "16"]), ("theory.table", ["--rank", "-1"]),
    ("theory.table", ["--rank", "100", "--shape", "16", "16"]),
    ("theory.table", ["--json", str(RO / "x.json")]),
    (R, ["--method", "nosuch"]), (R, ["--rank", "0"]), (R, ["--rank", "300"]),
    (R, ["--rank", "nan"]), (R, ["--target", MISSING]), (R, ["--target", str(NAN_TARGET)]),
    (R, ["--target", str(TEXT)]), (R, ["--size", "100000000"]), (R, ["--batch", "0"]),
    (R, ["--solver", "newton"]), (R, ["--method", "hut", "--solver", "svd"]),
    (R, ["--set", "alpha=nan"]), (R, ["--set", "nosuch=1"]), (R, ["--r1", "4", "--set", "r1=2"]),
    (R, ["--w0", MISSING]), (R, ["--device", "tpu"]), (R, ["--device", "cuda"]),
    (R, ["--json", str(RO / "x.json")]), (R, ["--out", str(RO / "sub")]),
    (R, ["--init", "foo"]), (R, ["--steps", "0"]),
    (S, ["--methods", "nosuch"]), (S, ["--ranks", "0"]), (S, ["--ranks", "a,b"]),
    (S, ["--ranks", "100", "--size", "16"]), (S, ["--size", "nan"]),
    (S, ["--size", "100000000"]), (S, ["--targets", "nosuch"]), (S, ["--seeds", "-1"]),
    (S, ["--conventions", "other"]), (S, ["--out", str(RO / "sub")]),
    (S, ["--executor", "slurm"]), (S, ["--executor", "local", "--address", "auto"]),
    (S, ["--executor", "ray", "--address", "127.0.0.1:1"]),
    (S, ["--executor", "ray", "--cpus-per-task", "0"]),
    (S, ["--executor", "ray", "--gpus-per-task", "-1"]),
    (S, ["--executor", "ray", "--device", "cuda", "--gpus-per-task", "0"]),
    (B, ["--only", "xyz"]), (B, ["--rank", "0"]), (B, ["--json", str(RO / "x.json")]),
    ("reconstruction.solver_study", ["--size", "16", "--ranks", "17"]),
    ("reconstruction.solver_study", ["--adam-lr", "nan"]),
    ("reconstruction.solver_study", ["--solvers", "newton"]),
    ("reconstruction.fig2_check", [MISSING]), ("reconstruction.fig2_check", ["--tol", "-1"]),
    ("rmt.run", ["--p", "0"]), ("rmt.run", ["--beta", "2"]), ("rmt.run", ["--gamma", "nan"]),
    ("rmt.run", ["--trials", "1", "--simulate"]), ("rmt.run", ["--alpha-grid", "1", "0", "5"]),
    ("rmt.run", ["--device", "cuda", "--simulate"]), ("rmt.run", ["--json", str(RO / "x")]),
    ("rmt.realdata", ["--n", "7"]), ("rmt.realdata", ["--shrink", "-1"]),
    ("rmt.realdata", ["--repeats", "0"]), ("rmt.bench", ["--trials", "0"]),
    ("rmt.bench", ["--threads", "0"]),
    (FT, ["--model", "bert"]), (FT, ["--task", "digits"]), (FT, ["--method", "nosuch"]),
    (FT, ["--rank", "0"]), (FT, ["--rank", "100000"]), (FT, ["--steps", "0"]),
    (FT, ["--lr", "nan"]), (FT, ["--lr", "-1"]), (FT, ["--warmup", "1.5"]),
    (FT, ["--set", "nosuch=1"]), (FT, ["--targets", "nosuch_layer"]),
    (FT, ["--optimizer", "newton"]), (FT, ["--optimizer", "sam", "--opt-set", "rho=-1"]),
    (FT, ["--impl", "peft", "--method", "smoa"]), (FT, ["--init", "foo"]),
    (FT, ["--device", "cuda"]), (FT, ["--out", str(RO / "sub")]),
    (FT, ["--json", str(RO / "x.json")]), (FT, ["--threads", "0"]),
    (FT, ["--batch", "100000000"]),
    ("finetune.compare", ["--methods", "nosuch"]), ("finetune.compare", ["--seeds", "0"]),
    ("finetune.compare", ["--lr-set", "abba=nan"]), ("finetune.compare", ["--lr-set", "abba"]),
    ("finetune.compare", ["--model", "mlp", "--task", "movie"]),
    ("finetune.compare", ["--out", str(RO / "sub")]),
    ("finetune.compare", ["--executor", "ray", "--address", "127.0.0.1:1"]),
    ("finetune.compare", ["--cpus-per-task", "2"]),
    ("finetune.bench", ["--methods", "nosuch"]), ("finetune.bench", ["--reps", "0"]),
    ("finetune.bench", ["--json", str(RO / "x.json")]),
    ("finetune.merge", ["--runs", MISSING]), ("finetune.merge", ["--runs", str(TMP)]),
    ("finetune.merge", ["--runs", MISSING, "--how", "average"]),
    ("finetune.merge", ["--density", "1.5"]), ("finetune.merge", ["--runs", MISSING, "--rank", "0"]),
    ("finetune.sharpness", [MISSING]), ("finetune.sharpness", [str(TMP), "--radius", "-1"]),
    ("finetune.sharpness", [str(TMP), "--iters", "0"]),
    ("finetune.optim.timing", ["--rules", "adamw,newton"]),
    ("finetune.optim.timing", ["--method", "nosuch"]),
    ("finetune.full", ["--steps", "0"]), ("finetune.full", ["--max-len", "100000"]),
    ("finetune.full", ["--summary", MISSING]), ("finetune.full", ["--out", str(RO / "x")]),
    ("finetune.smollm", ["--out", str(RO / "x")]), ("finetune.tiny", ["--steps", "0"]),
    ("figures.__main__", ["nosuch"]), ("figures.__main__", ["--out", str(RO / "sub")]),
    ("notebooks.__main__", ["--out", str(RO / "sub")]),
]


class _Ran(Exception):
    pass


def _alarm(*_):
    raise _Ran


def run_case(module: str, argv: list[str], limit: int) -> tuple[int | str, list[str]]:
    mod = importlib.import_module(module)
    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code: int | str = int(mod.main(argv) or 0)
            except SystemExit as e:
                code = int(e.code or 0) if not isinstance(e.code, str) else 1
            except _Ran:
                code = "ran"
            except Exception as e:  # noqa: BLE001 - an escaped exception is a finding
                code = f"escaped {type(e).__name__}"
                err.write(f"Traceback (escaped): {e}\n")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, [ln for ln in err.getvalue().splitlines() if ln.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/bad_inputs.py", description=__doc__)
    ap.add_argument("--only", default="", help="commands whose module starts with this")
    ap.add_argument("--limit", type=int, default=120, help="seconds before a row counts as ran")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print("| command | arguments | exit | stderr lines | stderr | traceback |")
    print("|---|---|---|---|---|---|")
    bad = 0
    for module, case in CASES:
        if not module.startswith(args.only):
            continue
        code, lines = run_case(module, case, args.limit)
        tb = any("Traceback" in ln for ln in lines)
        ok = code == 2 and len(lines) == 1 and not tb
        bad += not ok
        shown = " ".join(a.replace(str(TMP), "$TMP") for a in case)
        first = (lines[0] if lines else "").replace(str(TMP), "$TMP").replace("|", "\\|")
        name = module.removesuffix(".__main__")
        print(f"| python -m {name} | `{shown}` | {code} | {len(lines)} | {first[:160]} | "
              f"{'YES' if tb else 'no'} |{'' if ok else ' **not as promised**'}", flush=True)
    print(f"\n{bad} row(s) not as promised", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
