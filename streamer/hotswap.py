"""Finding the model to serve, and noticing when the registry points at a new one.

The watcher polls the registry's ``CURRENT`` pointer on its own thread and does the slow part
there (read, verify checksums, build the model, move it to the device). The serving loop only
picks up a ready, verified model between batches, so consumption pauses for the swap itself
(re-warming state), never for file I/O. A version that fails verification is refused, logged,
counted, and the old model keeps serving. A version that is *incomplete* (a file missing or not
matching its checksum yet, as during a file-by-file sync) is retried with exponential backoff
(1 s doubling to 60 s) until it verifies or a newer version appears; retries are counted.

Usage::

    artifact, watcher = open_model_source(Path("models"), "default", device, poll_s=5.0)
    watcher.start(); ...; candidate = watcher.take()   # Artifact | None
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import torch

from streamer.artifact import Artifact, load_artifact
from streamer.errors import ArtifactError, IncompleteArtifact, RegistryError
from streamer.registry import Registry, resolve_model_path

log = logging.getLogger(__name__)

RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0


def open_model_source(
    path: Path, name: str, device: torch.device, poll_s: float
) -> tuple[Artifact, ModelWatcher | None]:
    """Load what ``path`` serves now; a registry (not a bare artifact dir) also gets a watcher.

    A registry whose CURRENT cannot be loaded starts on the newest loadable version in HISTORY
    (logged; ``watcher.start_refusals`` says why) instead of failing the start."""
    artifact_dir, registry = resolve_model_path(Path(path), name)
    if registry is None:
        return load_artifact(artifact_dir, device), None
    artifact, refused_version, refusals = registry.load_serving(device)
    if refused_version is not None:
        log.error("CURRENT (%s) cannot be served; starting on %s, the newest loadable version "
                  "in HISTORY: %s", refused_version, artifact.metadata.version,
                  "; ".join(refusals))
    # The refused version counts as seen: it is not retried until CURRENT changes.
    watcher = ModelWatcher(registry, refused_version or artifact.metadata.version, device, poll_s)
    watcher.start_refusals = refusals if refused_version is not None else []
    return artifact, watcher


class ModelWatcher:
    def __init__(
        self, registry: Registry, serving: str, device: torch.device, poll_s: float
    ) -> None:
        self.registry = registry
        self.device = device
        self.poll_s = poll_s
        self._seen = serving  # last version handed over or refused (incomplete ones are retried)
        self.start_refusals: list[str] = []  # why CURRENT was not served at start, if it was not
        self._lock = threading.Lock()
        self._pointer_error = ""  # the last pointer problem logged
        self._ready: Artifact | None = None
        self._refusals: list[str] = []
        self._retries = 0  # retries of incomplete versions not yet taken by take_retries()
        self._retry_version: str | None = None  # the incomplete version being retried
        self._retry_at = 0.0
        self._retry_delay = RETRY_FIRST_S
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="model-watcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def take(self) -> Artifact | None:
        """The newest verified model not yet handed over, if any."""
        with self._lock:
            ready, self._ready = self._ready, None
            return ready

    def take_refusals(self) -> list[str]:
        with self._lock:
            refusals, self._refusals = self._refusals, []
            return refusals

    def take_retries(self) -> int:
        """How many times an incomplete version was tried again since the last call."""
        with self._lock:
            retries, self._retries = self._retries, 0
            return retries

    def check_now(self) -> None:
        """One poll of the pointer (the thread calls this every ``poll_s``)."""
        try:
            version = self.registry.current()
        except RegistryError as exc:
            if str(exc) != self._pointer_error:  # once per distinct problem, not every poll
                log.warning("cannot read the registry pointer, still serving: %s", exc)
            self._pointer_error = str(exc)
            return
        self._pointer_error = ""
        if version is None:
            return
        retrying = version == self._retry_version
        if version == self._seen and not retrying:
            return
        if retrying:
            if time.monotonic() < self._retry_at:
                return
            with self._lock:
                self._retries += 1
            log.info("retrying model version %s", version)
        else:
            self._retry_version, self._retry_delay = None, RETRY_FIRST_S
        self._seen = version
        try:
            artifact = self.registry.load(version, self.device)
        except (IncompleteArtifact, RegistryError) as exc:
            self._retry_version, self._retry_at = version, time.monotonic() + self._retry_delay
            log.warning("model version %s is incomplete, retrying in %.0f s: %s", version,
                        self._retry_delay, exc)
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX_S)
            with self._lock:
                self._refusals.append(f"{version}: {exc}")
            return
        except ArtifactError as exc:
            self._retry_version = None
            with self._lock:
                self._refusals.append(f"{version}: {exc}")
            return
        self._retry_version = None
        with self._lock:
            self._ready = artifact  # a newer version replaces one not yet picked up

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check_now()
            except Exception:  # the watcher must outlive any surprise; the loop keeps serving
                log.exception("model watcher poll failed")
