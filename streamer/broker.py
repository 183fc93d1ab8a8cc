"""Embedded Kafka broker: librdkafka's mock cluster, reached through ctypes.

Why: the demo and the integration tests need a real Kafka-protocol peer on loopback
sockets without a JVM or Docker. librdkafka (bundled in the confluent-kafka wheel) ships a
mock cluster that speaks the wire protocol; we drive its C API directly.

Usage::

    with EmbeddedBroker(num_brokers=1) as broker:
        broker.create_topic("events", partitions=4)
        print(broker.bootstrap_servers)
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
from pathlib import Path
from types import TracebackType

_RD_KAFKA_PRODUCER = 0

# Kafka protocol API keys and error codes the fault injectors take (Kafka protocol guide).
API_KEYS = {
    "Produce": 0, "Fetch": 1, "ListOffsets": 2, "Metadata": 3, "OffsetCommit": 8,
    "OffsetFetch": 9, "FindCoordinator": 10, "JoinGroup": 11, "Heartbeat": 12,
    "LeaveGroup": 13, "SyncGroup": 14,
}
ERROR_CODES = {
    "REQUEST_TIMED_OUT": 7, "NOT_LEADER_OR_FOLLOWER": 6, "COORDINATOR_NOT_AVAILABLE": 15,
    "NOT_COORDINATOR": 16, "ILLEGAL_GENERATION": 22, "UNKNOWN_MEMBER_ID": 25,
    "REBALANCE_IN_PROGRESS": 27,
}


def _find_librdkafka() -> str:
    """Locate the librdkafka shared library shipped inside the confluent-kafka wheel."""
    import confluent_kafka

    pkg = Path(confluent_kafka.__file__).resolve().parent
    candidates = sorted(glob.glob(str(pkg.parent / "confluent_kafka.libs" / "librdkafka*.so*")))
    candidates += sorted(glob.glob(str(pkg / ".dylibs" / "librdkafka*.dylib")))
    if not candidates:
        raise RuntimeError(f"librdkafka shared library not found next to {pkg}")
    return candidates[0]


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(_find_librdkafka())
    vp, cp, ci = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
    sigs: dict[str, tuple[list[type], type | None]] = {
        "rd_kafka_conf_new": ([], vp),
        "rd_kafka_conf_set": ([vp, cp, cp, cp, ctypes.c_size_t], ci),
        "rd_kafka_new": ([ci, vp, cp, ctypes.c_size_t], vp),
        "rd_kafka_destroy": ([vp], None),
        "rd_kafka_mock_cluster_new": ([vp, ci], vp),
        "rd_kafka_mock_cluster_destroy": ([vp], None),
        "rd_kafka_mock_cluster_bootstraps": ([vp], cp),
        "rd_kafka_mock_topic_create": ([vp, cp, ci, ci], ci),
        "rd_kafka_mock_broker_set_down": ([vp, ctypes.c_int32], ci),
        "rd_kafka_mock_broker_set_up": ([vp, ctypes.c_int32], ci),
        "rd_kafka_mock_broker_set_rtt": ([vp, ctypes.c_int32, ci], ci),
        "rd_kafka_mock_group_initial_rebalance_delay_ms": ([vp, ctypes.c_int32], None),
        "rd_kafka_mock_push_request_errors_array": (
            [vp, ctypes.c_int16, ctypes.c_size_t, ctypes.POINTER(ci)], None),
        "rd_kafka_mock_clear_request_errors": ([vp, ctypes.c_int16], None),
        "rd_kafka_mock_partition_set_leader": ([vp, cp, ctypes.c_int32, ctypes.c_int32], ci),
        "rd_kafka_mock_coordinator_set": ([vp, cp, cp, ctypes.c_int32], ci),
        "rd_kafka_err2str": ([ci], cp),
    }
    for name, (argtypes, restype) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = restype
    return lib


_lib_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def _library() -> ctypes.CDLL:
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _load()
        return _lib


class EmbeddedBroker:
    """A mock Kafka cluster living inside this process, listening on loopback TCP.

    Quirks worth knowing: it keeps only the newest ~5 MiB per partition, has no
    CreateTopics (use :meth:`create_topic` or auto-creation, 4 partitions), and transactional
    reads need ``check_crcs=False`` on kafka-python.
    """

    def __init__(self, num_brokers: int = 1, rebalance_delay_ms: int = 0) -> None:
        self._lib = _library()
        errstr = ctypes.create_string_buffer(512)
        conf = self._lib.rd_kafka_conf_new()
        # The handle only hosts the mock cluster; keep its own logging quiet.
        self._lib.rd_kafka_conf_set(conf, b"log_level", b"0", errstr, len(errstr))
        self._rk = self._lib.rd_kafka_new(_RD_KAFKA_PRODUCER, conf, errstr, len(errstr))
        if not self._rk:
            raise RuntimeError(f"rd_kafka_new failed: {errstr.value.decode()}")
        self._mc = self._lib.rd_kafka_mock_cluster_new(self._rk, num_brokers)
        if not self._mc:
            self._lib.rd_kafka_destroy(self._rk)
            raise RuntimeError("rd_kafka_mock_cluster_new failed")
        self._lib.rd_kafka_mock_group_initial_rebalance_delay_ms(self._mc, rebalance_delay_ms)
        self.bootstrap_servers: str = self._lib.rd_kafka_mock_cluster_bootstraps(self._mc).decode()
        self.num_brokers = num_brokers

    def create_topic(self, name: str, partitions: int = 4, replication_factor: int = 1) -> None:
        err = self._lib.rd_kafka_mock_topic_create(
            self._mc, name.encode(), partitions, replication_factor
        )
        self._check(err, f"create topic {name!r}")

    def set_broker_down(self, broker_id: int = 1) -> None:
        self._check(self._lib.rd_kafka_mock_broker_set_down(self._mc, broker_id), "broker down")

    def set_broker_up(self, broker_id: int = 1) -> None:
        self._check(self._lib.rd_kafka_mock_broker_set_up(self._mc, broker_id), "broker up")

    def set_rtt(self, rtt_ms: int, broker_id: int = 1) -> None:
        self._check(self._lib.rd_kafka_mock_broker_set_rtt(self._mc, broker_id, rtt_ms), "rtt")

    def push_request_errors(self, api: str, errors: list[str]) -> None:
        """The next ``len(errors)`` requests of ``api`` (a name in API_KEYS, e.g.
        "OffsetCommit") fail with these errors (names in ERROR_CODES), in order."""
        codes = (ctypes.c_int * len(errors))(*(ERROR_CODES[e] for e in errors))
        self._lib.rd_kafka_mock_push_request_errors_array(
            self._mc, API_KEYS[api], len(errors), codes)

    def clear_request_errors(self, api: str) -> None:
        self._lib.rd_kafka_mock_clear_request_errors(self._mc, API_KEYS[api])

    def set_partition_leader(self, topic: str, partition: int, broker_id: int) -> None:
        err = self._lib.rd_kafka_mock_partition_set_leader(
            self._mc, topic.encode(), partition, broker_id)
        self._check(err, f"leader of {topic}[{partition}]")

    def set_group_coordinator(self, group_id: str, broker_id: int) -> None:
        err = self._lib.rd_kafka_mock_coordinator_set(
            self._mc, b"group", group_id.encode(), broker_id)
        self._check(err, f"coordinator of group {group_id!r}")

    def close(self) -> None:
        if self._mc:
            self._lib.rd_kafka_mock_cluster_destroy(self._mc)
            self._mc = None
        if self._rk:
            self._lib.rd_kafka_destroy(self._rk)
            self._rk = None

    def _check(self, err: int, what: str) -> None:
        if err:
            raise RuntimeError(f"{what}: {self._lib.rd_kafka_err2str(err).decode()}")

    def __enter__(self) -> EmbeddedBroker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            if os.getpid() and getattr(self, "_mc", None):
                self.close()
        except Exception:
            pass
