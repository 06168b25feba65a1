"""Method-name conventions the report side needs too; import-light (no torch), so reports
can be built without loading the engine."""

from __future__ import annotations

VISKIP_PREFIX = "viskip+"  # `viskip+<method>`: ViSkip wrapped around a registered method
