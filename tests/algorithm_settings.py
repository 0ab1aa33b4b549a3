"""The central table: one tiny setting per registered algorithm, used by the generic tests.

A registered algorithm without an entry here fails ``test_every_algorithm_has_an_entry``.
"""

from __future__ import annotations

ALGORITHM_SETTINGS: dict[str, dict] = {
    "gradient_clipping": {"norm": 0.5},
}
