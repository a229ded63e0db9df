"""``python -m notebooks [NAME ...] [--out DIR]``: write the paired Jupyter notebooks.

Every ``notebooks/<name>.py`` (a jupytext py:percent script: the source kept under
version control, run by the tests) gets its ``<name>.ipynb`` beside it, unexecuted, so
that ``jupyter lab`` opens it with the intended cells; the header pairs the two
(``formats: ipynb,py:percent``), so with the jupytext extension an edit in either is
saved to both. The ``.ipynb`` files are not committed (``.gitignore``). The same with
jupytext's own command::

    jupytext --sync notebooks/*.py
"""

from __future__ import annotations

from pathlib import Path

import cli

HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_"))


def read(name: str):
    """The notebook of ``notebooks/<name>.py`` as Jupyter reads it: jupytext guesses the
    format from the header, which must say py:percent (without it the file is read as a
    "light" script, with stray ``# %%`` lines and the wrong cells)."""
    import jupytext

    path = HERE / f"{name}.py"
    nb = jupytext.reads(path.read_text(encoding="utf-8"), fmt="py")
    fmt = nb.metadata.get("jupytext", {}).get("text_representation", {}).get("format_name")
    if fmt != "percent":
        raise ValueError(f"{path} lacks the jupytext py:percent header (read as {fmt or 'light'})")
    return nb


def build_parser() -> cli.Parser:
    ap = cli.Parser(prog="python -m notebooks", description=__doc__)
    ap.add_argument("names", nargs="*",
                    help=f"notebooks (default: all of {', '.join(available())})")
    ap.add_argument("--out", type=Path, default=HERE, help="folder of the .ipynb files "
                    "(default: beside the sources)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        import jupytext

        names = available()
        unknown = [n for n in args.names if n not in names]
        if unknown:
            raise cli.UsageError(f"unknown notebook(s) {', '.join(unknown)}; known: "
                                 f"{', '.join(names)}")
        cli.check_writable_dir(args.out, "--out")
        for name in list(dict.fromkeys(args.names)) or names:
            nb = read(name)
            dest = args.out / f"{name}.ipynb"
            with cli.atomic_path(dest) as tmp:
                jupytext.write(nb, tmp, fmt="ipynb")
            print(f"{dest} ({len(nb.cells)} cells)")

    return cli.run(work, interrupted="the notebooks written before the interrupt are complete")


if __name__ == "__main__":
    raise SystemExit(main())
