"""Stage timers add what each stage took, and the shares add up to one."""

from __future__ import annotations

import time

from streamer.stages import STAGES, StageTimer


def test_laps_accumulate_per_stage_and_shares_sum_to_one() -> None:
    timer = StageTimer()
    t = timer.start()
    time.sleep(0.02)
    t = timer.lap("decode", t)
    time.sleep(0.01)
    timer.lap("commit", t)
    timer.add("engine", 0.03)
    totals = timer.totals()
    assert set(totals) == set(STAGES)
    assert 0.02 <= totals["decode"] < 0.5 and 0.01 <= totals["commit"] < 0.5
    assert totals["engine"] == 0.03 and totals["consume"] == 0.0
    assert abs(sum(timer.shares().values()) - 1.0) < 1e-9
    timer.reset()
    assert sum(timer.totals().values()) == 0.0 and set(timer.shares().values()) == {0.0}
