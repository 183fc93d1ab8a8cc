"""`streamer demo` as a newcomer runs it (shortened): trains, streams, swaps, exits cleanly."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_runs_the_whole_product_and_swaps_live() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "streamer.cli", "demo", "--duration", "14", "--keys", "20",
         "--rate", "300", "--history", "3000", "--metrics-address", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=240,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "summary" in out
    events_in, preds_out, dead = (
        int(re.search(rf"{label}\s+([\d,]+)", out).group(1).replace(",", ""))  # type: ignore[union-attr]
        for label in ("events in", "predictions out", "dead-lettered")
    )
    assert dead >= 3, "the demo's malformed messages went to the dead-letter topic"
    assert events_in > 1000 and preds_out + dead == events_in
    assert re.search(r"hot swaps\s+1\b", out), out[-2000:]
