"""Per fault on the embedded broker (3 brokers): events in, predictions out, duplicates,
missing, and the time from the fault's end to the first prediction emitted after it.

Each fault runs the real service against a steady producer (before, during and after the
fault); the scenarios are the ones tests/streamer/test_faults.py asserts on.

    .venv/bin/python benchmarks/bench_faults.py                 # every fault
    .venv/bin/python benchmarks/bench_faults.py --faults broker_down --events 20000
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamer.artifact import save_artifact  # noqa: E402
from tests.streamer.conftest import make_model  # noqa: E402
from tests.streamer.fault_scenarios import FAULTS, run_fault  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", default=",".join(FAULTS),
                        help=f"comma-separated, from: {', '.join(FAULTS)}")
    parser.add_argument("--events", type=int, default=3000, help="events per fault")
    parser.add_argument("--keys", type=int, default=200)
    ns = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    model_dir = Path(tempfile.mkdtemp(prefix="bench-faults-")) / "model"
    save_artifact(model_dir, make_model(seed=7), version="bench")
    print(f"{'fault':<30} {'duration':>8} {'events in':>9} {'predictions':>11} "
          f"{'duplicates':>10} {'missing':>7} {'recovery':>9} {'alive':>5}")
    for name in ns.faults.split(","):
        r = run_fault(name, model_dir, n_events=ns.events, keys=ns.keys)
        recovery = f"{r.recovery_s:.2f} s" if r.recovery_s is not None else "never"
        print(f"{name:<30} {FAULTS[name].duration_s:>6.0f} s {r.events_in:>9} "
              f"{r.predictions_out:>11} {r.duplicates:>10} {r.missing:>7} {recovery:>9} "
              f"{'yes' if r.alive else 'NO':>5}", flush=True)


if __name__ == "__main__":
    main()
