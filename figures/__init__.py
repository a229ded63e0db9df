"""Every figure of the toolkit, regenerated from code: ``python -m figures [NAME ...]``.

A figure lives in ``figures/<name>.py`` and defines ``draw(quick: bool) -> (Figure,
data)``, the matplotlib figure and the data it plots (what the tests check each curve
against), and ``make(out: Path, quick: bool) -> list[Path]``, which saves it as PNG +
PDF with :func:`figures.save.save` (atomic writes). It calls only public functions of
``theory``, ``reconstruction``, ``rmt`` and ``finetune``; every plotted line carries a
``gid`` naming what it is (``"theory β=0.5"``), so a test finds it without guessing.
"""

import cli  # noqa: I001 - first: Ctrl-C during the imports below is one line (cli.guard_startup)
cli.guard_startup()
