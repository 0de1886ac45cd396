"""``python -m lavp_core ...``: see :mod:`lavp_core.cli`."""

from .cli import main

raise SystemExit(main())
