"""`python -m openseek ...`: the same entry point as the `openseek` console script."""

from .cli import main

raise SystemExit(main())
