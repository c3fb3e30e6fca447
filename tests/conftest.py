from __future__ import annotations

import sys
from pathlib import Path

# tests/ holds shared helpers (tiny_models, tolerances) imported as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))
