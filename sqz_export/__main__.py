"""``python -m sqz_export`` is the same as the ``sqz-export`` command."""

from __future__ import annotations

import sys

from sqz_export.cli import main

sys.exit(main())
