"""``python -m chatd``: the same as the ``chatd`` command."""

from chatd.cli import main

raise SystemExit(main())
