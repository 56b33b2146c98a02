"""The quick power-cut sweep of a self-update, in both models: cuts while the new agent runs on
trial from staging, at the swap, after the hand-over and during the recovery."""
from __future__ import annotations

import os

import pytest

from tests.powercut.__main__ import QUICK_CUTS, QUICK_SECOND
from tests.powercut.sweep import fuse_available, run_sweep

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.mark.parametrize("model", ["data", "strict"])
def test_self_update_survives_a_power_cut_anywhere(cloud, tmp_path, model):
    why = fuse_available()
    if why:
        pytest.skip(f"power-cut tests need FUSE: {why}")
    if os.environ.get("GGC_OTA_AGENT"):
        pytest.skip("the self-update sweep publishes variants of the script")
    result = run_sweep(cloud, tmp_path, "agent", model, count=QUICK_CUTS, second_cuts=QUICK_SECOND,
                       log=lambda _: None)
    assert result["tried"] >= QUICK_CUTS
    assert not result["failures"], (f"{len(result['failures'])} of {result['tried']} cut points failed; the first:\n"
                                    + result["failures"][0].describe())
