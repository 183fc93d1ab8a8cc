"""The registry against real files: atomic publish, pointer, rollback, refusal of corruption."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from streamer.artifact import CHECKSUMS, METADATA, WEIGHTS, save_artifact, verify_checksums
from streamer.errors import ArtifactError, RegistryError
from streamer.registry import CURRENT, Registry, new_version_name, resolve_model_path
from tests.streamer.conftest import make_model


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "models", "default")


def test_publish_load_and_pointer(reg: Registry) -> None:
    assert reg.current() is None and reg.current_path() is None and reg.versions() == []
    model = make_model(hidden=8, layers=1, seed=1)
    v1 = reg.publish(model, metrics={"mae": 0.5}, data_range={"events": 10}, seed=1,
                     make_current=False)
    assert reg.current() is None  # published, not promoted
    v2 = reg.publish(make_model(hidden=8, layers=1, seed=2), make_current=True)
    assert reg.versions() == sorted([v1, v2]) and reg.current() == v2
    assert reg.current_path() == reg.dir / v2
    art = reg.load(v1)
    assert art.metadata.version == v1 and art.metadata.metrics == {"mae": 0.5}
    assert art.metadata.data_range == {"events": 10} and art.metadata.seed == 1
    torch.testing.assert_close(art.model.state_dict(), model.state_dict())
    assert reg.load().metadata.version == v2
    assert (reg.dir / CURRENT).read_text() == v2 + "\n"


def test_versions_are_immutable_and_sortable(reg: Registry) -> None:
    model = make_model(hidden=8, layers=1)
    v = reg.publish(model, version="v1")
    with pytest.raises(RegistryError, match="immutable"):
        reg.publish(model, version=v)
    names = [new_version_name(t) for t in (1.0, 1.001, 2.0, 1e9)]
    assert names == sorted(names) and len(set(names)) == 4


def test_promote_and_rollback_walk_back_through_history(reg: Registry) -> None:
    a, b, c = (reg.publish(make_model(hidden=8, layers=1, seed=s), make_current=True)
               for s in range(3))
    assert reg.current() == c
    assert reg.rollback() == b and reg.current() == b
    assert reg.rollback() == a and reg.current() == a  # further back, not back to c
    with pytest.raises(RegistryError, match="roll back"):
        reg.rollback()
    reg.promote(c)
    assert reg.rollback() == a  # the promotion of c came right after a
    actions = [(e["action"], e["version"]) for e in reg.history()]
    assert actions == [("promote", a), ("promote", b), ("promote", c), ("rollback", b),
                       ("rollback", a), ("promote", c), ("rollback", a)]


def test_promote_unknown_or_bad_names_refused(reg: Registry) -> None:
    reg.publish(make_model(hidden=8, layers=1), make_current=True)
    with pytest.raises(RegistryError, match="no version"):
        reg.promote("v-does-not-exist")
    with pytest.raises(RegistryError, match="invalid"):
        reg.promote("../escape")
    with pytest.raises(RegistryError, match="invalid"):
        Registry(reg.root, "a/b")


def test_half_written_version_is_invisible(reg: Registry) -> None:
    v = reg.publish(make_model(hidden=8, layers=1), make_current=True)
    # What a crashed publish leaves behind: a temp dir, possibly complete.
    save_artifact(reg.dir / ".tmp-crashed", make_model(hidden=8, layers=1), "vX")
    (reg.dir / "v-partial").mkdir()  # a directory without metadata is not a version
    assert reg.versions() == [v]
    assert reg.current() == v


# --- corruption ------------------------------------------------------------------------------


def _resum(directory: Path) -> None:
    """Recompute checksums so only the deeper checks can catch what we broke."""
    lines = []
    for name in (WEIGHTS, METADATA):
        digest = hashlib.sha256((directory / name).read_bytes()).hexdigest()
        lines.append(f"{digest}  {name}\n")
    (directory / CHECKSUMS).write_text("".join(lines))


def _flip_byte(directory: Path) -> None:
    data = bytearray((directory / WEIGHTS).read_bytes())
    data[-5] ^= 0xFF
    (directory / WEIGHTS).write_bytes(bytes(data))


def _nan_weights(directory: Path) -> None:
    weights = load_file(str(directory / WEIGHTS))
    weights["head.weight"][0, 0] = float("nan")
    save_file(weights, str(directory / WEIGHTS))
    _resum(directory)


def _wrong_dims(directory: Path) -> None:
    other = make_model(hidden=12, layers=1)  # metadata still says hidden=8
    save_file({k: v.contiguous() for k, v in other.state_dict().items()},
              str(directory / WEIGHTS))
    _resum(directory)


def _garbage(directory: Path) -> None:
    (directory / WEIGHTS).write_bytes(b"not a safetensors file")
    _resum(directory)


def _missing(directory: Path) -> None:
    (directory / WEIGHTS).unlink()


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [(_flip_byte, "checksum mismatch"), (_nan_weights, "non-finite"),
     (_wrong_dims, "shape"), (_garbage, "unreadable weights"), (_missing, "cannot read")],
)
def test_corrupt_version_is_refused_and_current_kept(reg: Registry, corrupt, message) -> None:
    good = reg.publish(make_model(hidden=8, layers=1, seed=0), make_current=True)
    bad = reg.publish(make_model(hidden=8, layers=1, seed=1))
    corrupt(reg.dir / bad)
    with pytest.raises(ArtifactError, match=message):
        reg.load(bad)
    with pytest.raises(ArtifactError, match=message):
        reg.promote(bad)
    assert reg.current() == good and reg.load().metadata.version == good


def test_metadata_version_must_match_directory(reg: Registry) -> None:
    v = reg.publish(make_model(hidden=8, layers=1))
    moved = reg.dir / "v-renamed"
    (reg.dir / v).rename(moved)
    with pytest.raises(ArtifactError, match="metadata says version"):
        reg.load("v-renamed")


def test_rollback_refuses_a_corrupted_target(reg: Registry) -> None:
    a = reg.publish(make_model(hidden=8, layers=1, seed=0), make_current=True)
    b = reg.publish(make_model(hidden=8, layers=1, seed=1), make_current=True)
    _flip_byte(reg.dir / a)
    with pytest.raises(ArtifactError):
        reg.rollback()
    assert reg.current() == b


# --- concurrency -----------------------------------------------------------------------------


def test_concurrent_reader_never_sees_a_partial_version(reg: Registry) -> None:
    """A reader hammers current()/load() while a writer publishes and promotes versions."""
    reg.publish(make_model(hidden=64, layers=2, seed=0), make_current=True)
    stop = threading.Event()
    seen: set[str] = set()
    errors: list[BaseException] = []
    loads = 0

    def reader() -> None:
        nonlocal loads
        while not stop.is_set():
            try:
                version = reg.current()
                assert version is not None
                art = reg.load(version)
                verify_checksums(art.path)
                assert art.metadata.version == version
                # Every version directory a reader can see is complete and loads.
                visible = [p for p in reg.dir.iterdir() if p.is_dir() and p.name[0] != "."]
                for path in visible:
                    assert (path / CHECKSUMS).exists(), f"{path.name} is incomplete"
                reg.load(max(p.name for p in visible))
                seen.add(version)
                loads += 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    published = [reg.publish(make_model(hidden=64, layers=2, seed=s), make_current=True)
                 for s in range(1, 26)]
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert not errors, errors[0]
    assert loads > 25 and len(seen) > 3
    assert reg.current() == published[-1]
    assert not list(reg.dir.glob(".tmp-*"))


# --- resolve_model_path ---------------------------------------------------------------------


def test_resolve_model_path(tmp_path: Path, reg: Registry) -> None:
    art_dir = tmp_path / "plain"
    save_artifact(art_dir, make_model(hidden=8, layers=1), "v1")
    assert resolve_model_path(art_dir, "default") == (art_dir, None)
    with pytest.raises(RegistryError, match="neither"):
        resolve_model_path(tmp_path / "missing", "default")
    reg.root.mkdir(parents=True)
    with pytest.raises(RegistryError, match="no version was published yet") as info:
        resolve_model_path(reg.root, "default")
    assert f"trainer train --input HISTORY.jsonl --registry {reg.root}" in str(info.value)
    v = reg.publish(make_model(hidden=8, layers=1), make_current=True)
    path, found = resolve_model_path(reg.root, "default")
    assert path == reg.dir / v and found is not None and found.current() == v
