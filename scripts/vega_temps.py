"""Write a real public series as `trainer` input: hourly air temperature (deg F) of Seattle and
San Francisco in 2010, from the `vega_datasets` package (bundled, read offline), as sensor
JSONL events, one key per city, in time order:

    {"sensor_id": "seattle", "ts": "2010-03-01T00:00:00Z", "readings": {"temp": 45.1}}

The source times are local wall-clock times without a zone; they are written as if UTC, so the
report's "hour of day (UTC)" reads as local hour.

    python scripts/vega_temps.py temps.jsonl --start 2010-03-01 --days 42
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

from vega_datasets import local_data

CITIES = {"seattle": local_data.seattle_temps, "sf": local_data.sf_temps}


def temps(start: datetime, days: float) -> list[dict[str, object]]:
    """Events from ``start`` (naive, read as UTC) for ``days`` days, sorted by time."""
    end = start + timedelta(days=days)
    events: list[tuple[datetime, str, float]] = []
    for city, dataset in CITIES.items():
        rows = dataset.raw().decode("utf-8").splitlines()  # the bundled CSV file as is
        header = rows[0].split(",")
        i_date, i_temp = header.index("date"), header.index("temp")
        for line in rows[1:]:
            cells = line.split(",")
            when = datetime.fromisoformat(cells[i_date].replace("/", "-"))
            if start <= when < end:
                events.append((when, city, float(cells[i_temp])))
    events.sort()
    return [{"sensor_id": city, "ts": when.replace(tzinfo=timezone.utc).isoformat()
             .replace("+00:00", "Z"), "readings": {"temp": temp}}
            for when, city, temp in events]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="JSONL file to write")
    parser.add_argument("--start", default="2010-03-01", help="first day (ISO date)")
    parser.add_argument("--days", type=float, default=42.0, help="days of history")
    args = parser.parse_args()
    events = temps(datetime.fromisoformat(args.start), args.days)
    args.out.write_text("".join(json.dumps(e) + "\n" for e in events))
    print(f"wrote {len(events)} events ({', '.join(CITIES)}) to {args.out}")


if __name__ == "__main__":
    main()
