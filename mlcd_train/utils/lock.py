"""Moved to :mod:`mlcd_core.lock` (the core layer, see docs/architecture.md); this name stays an alias
of that module (the same module object, so attributes and monkeypatches are shared)."""
import sys

import mlcd_core.lock

sys.modules[__name__] = mlcd_core.lock
