"""``python -m imbsam_fast``: the same command as ``imbsam-fast``."""

from .cli import main

raise SystemExit(main())
