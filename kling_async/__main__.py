"""``python -m kling_async``: the ``kling-async`` command line."""

from ._cli import main

raise SystemExit(main())
