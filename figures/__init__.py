"""Every figure of the toolkit, regenerated from code: ``python -m figures [NAME ...]``.

A figure lives in ``figures/<name>.py`` and defines ``make(out: Path, quick: bool)
-> list[Path]``; it calls only public functions of ``theory``, ``reconstruction``,
``rmt`` and ``finetune``, and saves PNG + PDF with :func:`figures.save.save`.
"""
