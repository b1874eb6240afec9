"""Thread budgets (facecast/live/budget.py): one stream's encoder may use every core,
several share them, and the count follows the pipelines that run."""

from __future__ import annotations

from facecast.live import budget


def test_encoders_share_the_cores_between_streams():
    assert budget.encoder_threads(2, 1) == 2
    assert budget.encoder_threads(2, 2) == 1
    assert budget.encoder_threads(2, 4) == 1  # never none
    assert budget.encoder_threads(16, 4) == 4
    assert budget.encoder_threads(8, 0) == 8  # an output opened before its pipeline counted


def test_running_pipelines_are_counted():
    cores = budget.cores()
    before = budget.live_streams()
    with budget.running():
        assert budget.live_streams() == before + 1
        assert budget.encoder_budget() == budget.encoder_threads(cores, before + 1)
        with budget.running():
            assert budget.live_streams() == before + 2
            assert budget.encoder_budget() == max(1, cores // (before + 2))
    assert budget.live_streams() == before
