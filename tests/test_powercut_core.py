"""The quick power-cut sweep of a core update, in the three models: an even sample of cut points,
and two cuts during the recovery itself. The whole sweep is `./build.sh powercut`;
docs/powercut.md says what is checked after each cut."""
from __future__ import annotations

import pytest

from tests.powercut.__main__ import QUICK_CUTS, QUICK_SECOND
from tests.powercut.sweep import fuse_available, run_sweep

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def sweep(cloud, tmp_path, kind: str, model: str) -> None:
    why = fuse_available()
    if why:
        pytest.skip(f"power-cut tests need FUSE: {why}")
    result = run_sweep(cloud, tmp_path, kind, model, count=QUICK_CUTS, second_cuts=QUICK_SECOND, log=lambda _: None)
    assert result["tried"] >= QUICK_CUTS
    assert not result["failures"], (f"{len(result['failures'])} of {result['tried']} cut points failed; the first:\n"
                                    + result["failures"][0].describe())


@pytest.mark.parametrize("model", ["data", "strict", pytest.param("posix", marks=pytest.mark.frozen)])
def test_core_update_survives_a_power_cut_anywhere(cloud, tmp_path, model):
    """Against the static binary too, in the posix model (the one that keeps the least)."""
    sweep(cloud, tmp_path, "core", model)
