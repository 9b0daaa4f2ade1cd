"""Real process trees on CPU. The prefill + decode cluster over tcp (`pd_cluster`) and the
mixed-worker one (`mixed_cluster`) are in tests/conftest.py: the examples' tests share the first,
and both stop once the last test that may use them has run."""

from __future__ import annotations

import pytest
from e2e_clusters import start_cluster

__all__ = ["start_cluster"]  # tests/e2e/test_embeddings_and_rewards.py imports it from here

pytestmark = pytest.mark.slow
