"""Schemathesis CLI hooks for Centroid (``SCHEMATHESIS_HOOKS=tests.reliability.st_hooks``).

Registers the ``text/csv`` / ``application/jsonlines`` serializers and, when ``CENTROID_FUZZ_SEEDS``
names the file written by ``python -m tests.reliability.fuzz_support seed``, the hooks that aim
generated cases at the seeded datasets, models, jobs and endpoints. See docs/reliability.md.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.reliability.fuzz_support import SEEDS_ENV, Seeds, register_hooks, register_serializers

register_serializers()
if os.environ.get(SEEDS_ENV):
    register_hooks(Seeds.load(Path(os.environ[SEEDS_ENV])))
