"""``python -m reconstruction`` = ``python -m reconstruction.run`` (see its --help);
``python -m reconstruction.sweep`` and ``python -m reconstruction.bench`` are the others."""

from .run import main

if __name__ == "__main__":
    raise SystemExit(main())
