"""``python -m finetune.archive``: keep the records of finished runs, without their tensors.

    python -m finetune.archive --out runs --to records/finetune --model minilm --task movie
    python -m finetune.compare ... --out records/finetune --report-only   # the table again

A comparison's table needs, per run, only its ``run.json`` and its cached measures
(``analysis.json``: ranks, cosine and overlap with full fine-tuning, written by
``finetune.compare``) and, per model and task, the cached reconstruction fits
(``reconstruction/*.json``). The tensors (``deltas.safetensors``: 85 MB per MiniLM run)
are needed once, to compute those caches. This copies the small files of every finished
run whose measures are cached, each written atomically; a run without its measures is
left out and named (run ``finetune.compare --report-only`` on it first). The README's
fine-tuning tables are rebuilt from the kept records in the repository (``records/``),
and a later session adds seeds or methods beside them: ``finetune.compare --out
records/finetune`` never retrains a kept run (a new run of a seed whose full
fine-tuning is kept needs that run's deltas, so add whole seeds).
"""

from __future__ import annotations

import sys
from pathlib import Path

import cli

from . import runs as R

SMALL = ("run.json", "analysis.json")


def archive(out: str | Path, to: str | Path, model: str | None = None,
            task: str | None = None) -> dict[str, list[str]]:
    """Copy the small files of the finished runs under ``out`` (one model/task or all) to
    ``to``, same layout. Returns ``{"kept": [...], "skipped": [...], "fits": [...]}``;
    skipped runs have no cached measures."""
    out, to = Path(out), Path(to)
    if not out.is_dir():
        raise FileNotFoundError(f"--out {out}: no such runs folder")
    recs = R.find_runs(out, model, task)
    if not recs:
        which = " ".join(x for x in (model, task) if x) or "any model"
        raise ValueError(f"--out {out}: no finished runs of {which} there")
    kept, skipped, fits = [], [], []
    for rec in recs:
        src = Path(rec["dir"])
        rel = src.relative_to(out)
        if not (src / "analysis.json").is_file():
            skipped.append(str(rel))
            continue
        for name in SMALL:
            cli.atomic_write(to / rel / name, (src / name).read_bytes())
        kept.append(str(rel))
    for p in sorted(out.glob(f"{model or '*'}/{task or '*'}/reconstruction/*.json")):
        cli.atomic_write(to / p.relative_to(out), p.read_bytes())
        fits.append(str(p.relative_to(out)))
    return {"kept": kept, "skipped": skipped, "fits": fits}


def build_parser() -> cli.Parser:
    ap = cli.Parser(prog="python -m finetune.archive", description=__doc__)
    ap.add_argument("--out", type=Path, default=R.DEFAULT_OUT,
                    help="runs folder to read (default runs)")
    ap.add_argument("--to", type=Path, required=True, help="folder of the kept records")
    ap.add_argument("--model", help="one model (default all)")
    ap.add_argument("--task", help="one task (default all)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        cli.check_writable_dir(args.to, "--to")
        res = archive(args.out, args.to, args.model, args.task)
        print(f"kept {len(res['kept'])} run record(s) and {len(res['fits'])} reconstruction "
              f"fit(s) under {args.to}")
        if res["skipped"]:
            print(f"left out (no cached measures; run finetune.compare --report-only first): "
                  f"{', '.join(res['skipped'])}", file=sys.stderr)

    return cli.run(work)


if __name__ == "__main__":
    raise SystemExit(main())
