"""``python -m rmt`` is ``python -m rmt.run``."""

from rmt.run import main

raise SystemExit(main())
