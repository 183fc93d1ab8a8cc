"""Prediction records as JSON bytes, a batch at a time, without a Python dict per event.

One byte template per record, filled with ``bytes %`` (C), and the numbers formatted once per
batch by orjson: the whole prediction matrix (float64, so each number prints exactly as
``repr(float)`` and ``json.dumps`` would) is serialized in one call and split into rows, which
is safe because a JSON number never contains ``]``. Keys and raw event times go through
``orjson.dumps`` one by one (escaping). The output parses to exactly what
``json.dumps({...})`` of the same fields gives (tests/streamer/test_encode.py proves it).

Every number must be finite: the caller dead-letters non-finite rows first (RFC 8259 has no
NaN/Infinity), and :func:`encode_predictions` refuses them rather than print ``null``.

Usage::

    values = encode_predictions(keys, ts_raw, partitions, offsets, preds, "v3", time.time())
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import orjson

_TEMPLATE = (b'{"key":%b,"ts":%b,"partition":%d,"offset":%d,"prediction":[%b],'
             b'"model_version":%b,"emitted_at":%b}')
_WITH_CHANGE = _TEMPLATE[:-1] + b',"change":[%b]}'


def _rows(values: np.ndarray, n: int) -> list[bytes]:
    """Each row of ``values`` as the inside of a JSON array, one orjson call for all."""
    rows = np.asarray(values, dtype=np.float64).reshape(n, -1)
    if not np.isfinite(rows).all():
        raise ValueError("non-finite prediction: dead-letter those rows before encoding")
    return orjson.dumps(rows, option=orjson.OPT_SERIALIZE_NUMPY)[2:-2].split(b"],[")


def encode_predictions(
    keys: Sequence[str],
    ts_raw: Sequence[object],
    partitions: Sequence[int],
    offsets: Sequence[int],
    preds: np.ndarray,
    version: str,
    emitted_at: float,
    changes: np.ndarray | None = None,
) -> list[bytes]:
    """One JSON object per row of ``preds`` [N, out] (any float dtype), in input order.

    Fields: key (str), ts (the event's own time value, as received), partition and offset of
    the input record, prediction (list of ``out`` floats), model_version, emitted_at (epoch s),
    and ``change`` ([1] float: prediction minus the last value) when ``changes`` [N] is given.
    Raises ValueError when ``preds`` or ``changes`` holds a non-finite number.
    """
    n = len(keys)
    if n == 0:
        return []
    pred_rows = _rows(preds, n)  # [[a,b],[c,d]] -> [b"a,b", b"c,d"]
    dumps = orjson.dumps
    tail = (dumps(version), dumps(float(emitted_at)))
    if changes is not None:
        return [
            _WITH_CHANGE % (dumps(k), dumps(t), p, o, r, *tail, c)
            for k, t, p, o, r, c in zip(keys, ts_raw, partitions, offsets, pred_rows,
                                        _rows(changes, n), strict=True)
        ]
    return [
        _TEMPLATE % (dumps(k), dumps(t), p, o, r, *tail)
        for k, t, p, o, r in zip(keys, ts_raw, partitions, offsets, pred_rows, strict=True)
    ]
