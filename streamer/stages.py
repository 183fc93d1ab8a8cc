"""Per-stage timers of the service loop: where a batch's wall time goes.

The loop adds the seconds each stage took; ``streamer bench`` reads the totals and prints the
share of each. Cost: two ``perf_counter`` calls per stage per batch, nothing per event.

Stages, in loop order:

- ``consume``: inside the Kafka client's poll, including waiting for the batch to fill;
- ``decode``: bytes to validated events (``streamer.events.decode_batch``);
- ``engine``: the batched LSTM step (``Engine.process``);
- ``encode``: predictions to JSON bytes;
- ``produce``: handing records to the producer;
- ``commit``: waiting for acknowledgements and committing offsets.

Usage::

    timer = StageTimer()
    t = timer.start()
    ...                               # decode
    t = timer.lap("decode", t)        # adds the elapsed seconds, returns a new start
    timer.totals()                    # {"consume": s, "decode": s, ...}
"""

from __future__ import annotations

import time

STAGES = ("consume", "decode", "engine", "encode", "produce", "commit")


class StageTimer:
    """Seconds spent per stage since creation or the last :meth:`reset` (project code)."""

    def __init__(self) -> None:
        self._seconds = dict.fromkeys(STAGES, 0.0)

    @staticmethod
    def start() -> float:
        return time.perf_counter()

    def lap(self, stage: str, since: float) -> float:
        """Add ``now - since`` seconds to ``stage`` (one of STAGES); returns ``now``."""
        now = time.perf_counter()
        self._seconds[stage] += now - since
        return now

    def add(self, stage: str, seconds: float) -> None:
        self._seconds[stage] += seconds

    def totals(self) -> dict[str, float]:
        return dict(self._seconds)

    def shares(self) -> dict[str, float]:
        """Each stage's fraction of the summed stage time (0 when nothing was timed)."""
        total = sum(self._seconds.values())
        return {k: (v / total if total > 0 else 0.0) for k, v in self._seconds.items()}

    def reset(self) -> None:
        for k in self._seconds:
            self._seconds[k] = 0.0
