"""Apache Kafka (the official ``apache/kafka`` image) as a testcontainer, and the Docker check.

testcontainers-python 4.x ships ``KafkaContainer`` for Confluent's ``cp-kafka`` image only: its
start script runs ``/etc/confluent/docker/*``, which the official image does not have. The
official image reads the same ``KAFKA_*`` variables but starts with ``/etc/kafka/docker/run``
and, in KRaft mode, needs the controller settings spelled out. The base class's trick is kept:
the container waits for a start script that is written only after Docker has mapped the port,
because the advertised listener must carry that host port.

    with ApacheKafkaContainer() as kafka:
        bootstrap = kafka.get_bootstrap_server()
"""

from __future__ import annotations

from testcontainers.community.kafka import KafkaContainer
from typing_extensions import Self

IMAGE = "apache/kafka:3.8.0"  # the version deploy/compose runs
CONTROLLER_PORT = 9094
# Logged once the broker has caught up with the metadata log and serves clients.
READY_LOG = r".*Transitioning from RECOVERY to RUNNING.*"


def docker_unavailable_reason() -> str | None:
    """Why no Docker engine can run the container, or None when one answers a ping."""
    try:
        import docker
    except ImportError as exc:
        return f"the docker SDK is not installed ({exc})"
    try:
        client = docker.from_env(timeout=5)
    except Exception as exc:  # DockerException when no socket / DOCKER_HOST answers
        return f"no Docker engine answers: {type(exc).__name__}: {str(exc)[:200]}"
    try:
        client.ping()
    except Exception as exc:
        return f"no Docker engine answers a ping: {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        client.close()
    return None


class ApacheKafkaContainer(KafkaContainer):
    """One KRaft node (broker + controller) of the official image, reachable from the host.

    Listeners: PLAINTEXT on 9093 (mapped to the host, advertised as host:mapped-port), BROKER on
    9092 (inside the container network), CONTROLLER on 9094 (the node's own quorum).
    """

    def __init__(self, image: str = IMAGE) -> None:
        super().__init__(image, wait_strategy_check_string=READY_LOG)

    def configure(self) -> None:
        # KRaft rejects a broker.id that is not the node.id; node.id is the one KRaft reads.
        self.env.pop("KAFKA_BROKER_ID", None)
        self.with_env("CLUSTER_ID", self.cluster_id)
        self.with_env("KAFKA_NODE_ID", "1")
        self.with_env("KAFKA_PROCESS_ROLES", "broker,controller")
        self.with_env("KAFKA_LISTENERS", f"{self.listeners},CONTROLLER://0.0.0.0:{CONTROLLER_PORT}")
        self.with_env(
            "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP",
            f"{self.security_protocol_map},CONTROLLER:PLAINTEXT",
        )
        self.with_env("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER")
        self.with_env("KAFKA_CONTROLLER_QUORUM_VOTERS", f"1@localhost:{CONTROLLER_PORT}")
        self.with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
        self.with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
        # The image runs as a non-root user; /tmp is writable for it.
        self.with_env("KAFKA_LOG_DIRS", "/tmp/kraft-combined-logs")

    def tc_start(self) -> None:
        host = self.get_container_host_ip()
        port = self.get_exposed_port(self.port)
        script = (
            f"export KAFKA_ADVERTISED_LISTENERS="
            f"{self.listener_name}://{host}:{port},BROKER://$(hostname):9092\n"
            "exec /etc/kafka/docker/run\n"
        )
        self.create_file(script.encode(), self.TC_START_SCRIPT)

    def start(self, timeout: int = 120) -> Self:
        # The first start on a machine formats the log dir and warms the JVM: allow for it.
        return super().start(timeout=timeout)
