"""``python -m imbsam_fast``: the same command as ``imbsam-fast``."""

from .apps.cli import main

raise SystemExit(main())
