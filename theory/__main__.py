"""``python -m theory``: the budget table (see ``theory.table``)."""

import sys

from .table import main

sys.exit(main())
