"""The quick power-cut sweep of a core update that rolls back (its new core does not start), in
the three models."""
from __future__ import annotations

import pytest

from tests.test_powercut_core import sweep

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.mark.parametrize("model", ["data", "strict", "posix"])
def test_rollback_survives_a_power_cut_anywhere(cloud, tmp_path, model):
    sweep(cloud, tmp_path, "rollback", model)
