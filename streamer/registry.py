"""The model registry: a directory of immutable, versioned artifacts plus an atomic pointer.

Why a plain directory: a local path or a mounted volume is all the trainer (writer) and the
streamer (reader) need to share, and POSIX rename gives the atomicity a reader relies on.

Layout::

    <root>/<name>/<version>/     a complete artifact (streamer.artifact), never modified
    <root>/<name>/CURRENT        the serving version's name (one line), replaced atomically
    <root>/<name>/HISTORY        JSON lines, one per promotion or rollback (append-only)
    <root>/<name>/.tmp-<uuid>/   a version being written; invisible to readers
    <root>/<name>/.lock          serializes pointer changes between processes

A reader never sees a half-written version: a version is written into a hidden temp dir,
fsynced, then renamed into place. ``current()`` is one small file read, cheap to poll.

Usage::

    reg = Registry(Path("models"), "default")
    version = reg.publish(model, metrics={...}, data_range={...}, seed=0, make_current=True)
    art = reg.load()            # the current version, checksums verified
    reg.rollback()              # back to the previously promoted version
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from streamer.artifact import METADATA, Artifact, load_artifact, read_metadata, save_artifact
from streamer.errors import ArtifactError, RegistryError
from streamer.model import LSTMModel

CURRENT = "CURRENT"
HISTORY = "HISTORY"
_LOCK = ".lock"
_TMP_PREFIX = ".tmp-"
_STALE_TMP_S = 24 * 3600.0  # a temp dir this old belongs to a crashed publish
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def new_version_name(now: float | None = None) -> str:
    """``v20250101T120000.123Z-a1b2c3``: sorts by creation time (to the millisecond); the
    random suffix keeps two writers in the same millisecond apart."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, tz=timezone.utc)
    return f"v{stamp:%Y%m%dT%H%M%S}.{stamp.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


def _check_name(what: str, value: str) -> str:
    if not _NAME.match(value):
        raise RegistryError(f"invalid {what} {value!r}: use letters, digits, '.', '_', '-'")
    return value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for child in path.iterdir():
        with child.open("rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(path)


class Registry:
    """One model name's versions under ``root``; safe for one writer and many readers."""

    def __init__(self, root: Path, name: str = "default") -> None:
        self.root = Path(root)
        self.name = _check_name("model name", name)
        self.dir = self.root / name

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r}, {self.name!r})"

    # --- reading (the streamer's side) --------------------------------------------------

    def current(self) -> str | None:
        """The serving version, or None before the first promotion. One small file read."""
        try:
            text = (self.dir / CURRENT).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:  # a torn or garbled pointer file
            raise RegistryError(f"{self.dir / CURRENT}: unreadable: {exc}") from exc
        if not text:
            raise RegistryError(f"{self.dir / CURRENT} is empty")
        return _check_name("version in CURRENT", text)

    def current_path(self) -> Path | None:
        version = self.current()
        return None if version is None else self.dir / version

    def versions(self) -> list[str]:
        """Every complete version, oldest first (names sort by creation time)."""
        if not self.dir.is_dir():
            return []
        return sorted(
            p.name for p in self.dir.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / METADATA).exists()
        )

    def path(self, version: str) -> Path:
        path = self.dir / _check_name("version", version)
        if not path.is_dir():
            raise RegistryError(f"{self}: no version {version!r}")
        return path

    def load(self, version: str | None = None, device: torch.device | str = "cpu") -> Artifact:
        """Load ``version`` (default: current), verified; ArtifactError if it is broken."""
        if version is None:
            version = self.current()
            if version is None:
                raise RegistryError(f"{self}: no current version (publish or promote one)")
        art = load_artifact(self.path(version), device=device)
        if art.metadata.version != version:
            raise ArtifactError(
                f"{art.path}: metadata says version {art.metadata.version!r}, "
                f"directory says {version!r}"
            )
        return art

    def load_serving(
        self, device: torch.device | str = "cpu"
    ) -> tuple[Artifact, str | None, list[str]]:
        """What to serve at start: the current version or, when it cannot be loaded (corrupt,
        incomplete, or CURRENT itself unreadable), the newest loadable version HISTORY names.

        Returns (artifact, the CURRENT version that was refused or None, refusal messages).
        Raises RegistryError when nothing was ever promoted or no named version loads.
        """
        refused: list[str] = []
        failed: str | None = None
        try:
            current = self.current()
        except RegistryError as exc:
            current, failed = None, CURRENT
            refused.append(str(exc))
        if current is None and failed is None:
            raise RegistryError(f"{self}: no current version (publish or promote one)")
        if current is not None:
            try:
                return self.load(current, device), None, refused
            except (ArtifactError, RegistryError) as exc:
                failed = current
                refused.append(f"{current}: {exc}")
        tried = {failed}
        for entry in reversed(self.history()):
            version = entry.get("version")
            if not isinstance(version, str) or version in tried:
                continue
            tried.add(version)
            try:
                return self.load(version, device), failed, refused
            except (ArtifactError, RegistryError) as exc:
                refused.append(f"{version}: {exc}")
        raise RegistryError(f"{self}: no loadable version: " + "; ".join(refused))

    def history(self) -> list[dict[str, Any]]:
        """Pointer changes, oldest first; a torn last line (crash mid-append) is skipped."""
        try:
            lines = (self.dir / HISTORY).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return entries

    # --- writing (the trainer's side) ---------------------------------------------------

    def publish(
        self,
        model: LSTMModel,
        *,
        metrics: dict[str, Any] | None = None,
        data_range: dict[str, Any] | None = None,
        seed: int | None = None,
        make_current: bool = False,
        version: str | None = None,
    ) -> str:
        """Write a new immutable version (temp dir, fsync, rename); optionally promote it."""
        version = _check_name("version", version or new_version_name())
        final = self.dir / version
        if final.exists():
            raise RegistryError(f"{self}: version {version!r} exists; versions are immutable")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._sweep_stale_tmp()
        tmp = self.dir / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            save_artifact(tmp, model, version, metrics=metrics, data_range=data_range, seed=seed)
            _fsync_tree(tmp)
            # rename(2) would silently replace an *empty* directory, so check again right
            # before; a non-empty one makes it fail, which is the immutability guarantee.
            if final.exists():
                raise RegistryError(f"{self}: version {version!r} appeared while publishing")
            os.rename(tmp, final)
            _fsync_dir(self.dir)
        except OSError as exc:
            raise RegistryError(f"{self}: cannot publish {version!r}: {exc}") from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        if make_current:
            self.promote(version)
        return version

    def promote(self, version: str) -> None:
        """Point CURRENT at ``version`` after verifying it loads; a broken one is refused."""
        path = self.path(version)
        load_artifact(path)  # refuse to point readers at something they would reject
        if read_metadata(path).version != version:
            raise ArtifactError(f"{path}: metadata version does not match the directory name")
        with self._locked():
            previous = self.current()
            if previous == version:
                return
            self._write_current(version)
            self._append_history({"action": "promote", "version": version, "previous": previous})

    def rollback(self) -> str:
        """Make the previously promoted version current again; returns it.

        Repeated rollbacks walk further back (the history is replayed as a stack), so two
        rollbacks never just flip between the same two versions.
        """
        with self._locked():
            current = self.current()
            stack = self._promotion_stack()
            while stack and stack[-1] == current:
                stack.pop()
            if not stack:
                raise RegistryError(f"{self}: no earlier promoted version to roll back to")
            target = stack[-1]
            load_artifact(self.path(target))
            self._write_current(target)
            self._append_history({"action": "rollback", "version": target, "previous": current})
            return target

    def _promotion_stack(self) -> list[str]:
        stack: list[str] = []
        for entry in self.history():
            version = entry.get("version")
            if entry.get("action") == "promote" and isinstance(version, str):
                stack.append(version)
            elif entry.get("action") == "rollback":
                while stack and stack[-1] != version:
                    stack.pop()
        return stack

    def _write_current(self, version: str) -> None:
        tmp = self.dir / f"{_TMP_PREFIX}{CURRENT}-{uuid.uuid4().hex}"
        try:
            with tmp.open("w", encoding="utf-8") as f:
                f.write(version + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / CURRENT)  # atomic: readers see the old or the new name
            _fsync_dir(self.dir)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise RegistryError(f"{self}: cannot switch CURRENT to {version!r}: {exc}") from exc

    def _append_history(self, entry: dict[str, Any]) -> None:
        line = json.dumps({"at": time.time(), **entry}, separators=(",", ":")) + "\n"
        try:
            fd = os.open(self.dir / HISTORY, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            # CURRENT already switched; only rollback bookkeeping is lost, so say so loudly.
            raise RegistryError(f"{self}: switched CURRENT but cannot append to HISTORY: {exc}"
                                ) from exc

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / _LOCK).open("a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _sweep_stale_tmp(self) -> None:
        cutoff = time.time() - _STALE_TMP_S
        for p in self.dir.glob(f"{_TMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                if p.stat().st_mtime >= cutoff:
                    continue
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()


def resolve_model_path(path: Path, name: str = "default") -> tuple[Path, Registry | None]:
    """An artifact dir is used as is; anything else is a registry root (its current version).

    Returns the artifact directory to load and the registry to poll (None for a plain dir).
    """
    path = Path(path)
    if (path / METADATA).is_file():
        return path, None
    if not path.is_dir():
        raise RegistryError(f"{path}: neither an artifact directory nor a registry root")
    registry = Registry(path, name)
    current = registry.current_path()
    if current is None:
        raise RegistryError(
            f"{registry}: no current version; no version was published yet. Publish one with "
            f"`trainer train --input HISTORY.jsonl --registry {path} --model-name {name}` "
            f"(or an untrained one with `trainer init --registry {path}`)"
        )
    return current, registry
