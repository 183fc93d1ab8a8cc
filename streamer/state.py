"""Per-key state in preallocated device tensors, addressed through a key -> slot map.

One slot holds everything a key needs between events: the LSTM's h and c for every layer, the
previous raw observation that features depend on, the key's normalization statistics and
event count (``stats``, ``count``: see ``streamer.features.normalize_steps``), and a ring buffer
of the last W model inputs (so a hot-swapped model can re-warm the key). Slots are recycled:
least recently used keys are evicted at capacity, idle keys after an optional TTL, and a
partition's keys when the partition is revoked. A new or evicted key starts from zeros.

Usage::

    store = StateStore(layers=2, hidden=64, raw_width=8, n_features=8, capacity=100_000)
    store = StateStore.for_model(model, capacity=100_000, window=32)
    slots, is_new, evicted = store.assign(["k1", "k2"], [0, 3], now=time.time())
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from streamer.features import STAT_SLOTS
from streamer.model import LSTMModel

# Every per-slot state tensor of a store, by attribute name: the layered ones are [L, slots, H]
# (slot on dim 1), the row ones [slots, ...]. What copies, guards, snapshots or serializes a
# key's whole state walks these (engine guard, CUDA graph identity, checkpoint records).
LAYER_TENSORS = ("h", "c")
ROW_TENSORS = ("prev_raw", "prev_ts", "has_prev", "stats", "count", "win", "win_next", "win_len")


class StateStore:
    def __init__(
        self,
        layers: int,
        hidden: int,
        raw_width: int,
        n_features: int,
        capacity: int,
        window: int = 32,
        device: torch.device | str = "cpu",
        ttl_s: float | None = None,
        stat_width: int = 0,
    ) -> None:
        self.capacity = capacity
        self.window = window
        self.ttl_s = ttl_s
        self.device = torch.device(device)
        dev = self.device
        self.h = torch.zeros(layers, capacity, hidden, device=dev)  # [L, slots, H]
        self.c = torch.zeros(layers, capacity, hidden, device=dev)  # [L, slots, H]
        self.prev_raw = torch.zeros(capacity, raw_width, dtype=torch.float64, device=dev)  # [S, R]
        self.prev_ts = torch.zeros(capacity, dtype=torch.float64, device=dev)  # [S]
        self.has_prev = torch.zeros(capacity, dtype=torch.bool, device=dev)  # [S]
        self.stats = torch.zeros(capacity, stat_width, STAT_SLOTS, dtype=torch.float64,
                                 device=dev)  # [S, C, 3] per-key normalization statistics
        self.count = torch.zeros(capacity, dtype=torch.float64, device=dev)  # [S] events seen
        self.win = torch.zeros(capacity, window, n_features, device=dev)  # [S, W, F] ring
        self.win_next = torch.zeros(capacity, dtype=torch.int64, device=dev)  # [S] write pos
        self.win_len = torch.zeros(capacity, dtype=torch.int64, device=dev)  # [S] <= W
        # Host-side bookkeeping: per key, never per event.
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # LRU order, oldest first
        self._key_of: list[str | None] = [None] * capacity
        self._partition = np.full(capacity, -1, dtype=np.int64)
        self._last_seen = np.zeros(capacity, dtype=np.float64)
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        # Changelog bookkeeping (see streamer.recovery): slots changed since their partition's
        # last checkpoint, and keys evicted since then (their changelog entry gets a tombstone,
        # so a restore starts them cold as an uninterrupted run would). None: not tracked.
        self.dirty = np.zeros(capacity, dtype=bool)
        self.evictions: list[tuple[str, int]] | None = None

    @classmethod
    def for_model(
        cls, model: LSTMModel, capacity: int, window: int = 32,
        device: torch.device | str = "cpu", ttl_s: float | None = None,
    ) -> StateStore:
        """A store shaped for ``model``: its layers, hidden size, raw width, inputs, statistics."""
        cfg, spec = model.config, model.spec
        return cls(cfg.num_layers, cfg.hidden_size, spec.raw_width, spec.n_inputs, capacity,
                   window, device, ttl_s, spec.stat_width)

    def reshape(self, layers: int, hidden: int) -> None:
        """Re-allocate h and c as [layers, capacity, hidden] zeros (a model of another depth or
        width); everything else a key keeps (features memory, statistics, window) stays."""
        rows = self.h.shape[1]  # capacity, plus the scratch slot once there is one
        with torch.inference_mode(False):  # normal tensors: a restore writes them outside it
            self.h = torch.zeros(layers, rows, hidden, device=self.device)
            self.c = torch.zeros(layers, rows, hidden, device=self.device)

    def scratch_slot(self) -> int:
        """Index of a row past ``capacity`` that no key ever owns (every state tensor grows by
        one zero row on the first call): padding rows of a bucketed step read and write it
        (``streamer.graphs``), so they never touch a key's state. Returns ``capacity``."""
        if self.prev_ts.shape[0] > self.capacity:
            return self.capacity
        # Normal tensors even when called in inference mode (the engine's step): a changelog
        # restore writes them outside it, which an inference tensor would refuse.
        with torch.inference_mode(False):
            for name in ROW_TENSORS:
                tensor = getattr(self, name)
                setattr(self, name, torch.cat([tensor, tensor.new_zeros(1, *tensor.shape[1:])]))
            for name in LAYER_TENSORS:
                tensor = getattr(self, name)
                setattr(self, name, torch.cat(
                    [tensor, tensor.new_zeros(tensor.shape[0], 1, tensor.shape[2])], 1))
        return self.capacity

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, key: object) -> bool:
        return key in self._slot_of

    @property
    def bytes_per_key(self) -> int:
        """Device bytes one slot costs (all state tensors divided by their rows)."""
        tensors = [getattr(self, name) for name in (*LAYER_TENSORS, *ROW_TENSORS)]
        return sum(t.element_size() * t.nelement() for t in tensors) // self.prev_ts.shape[0]

    def slot(self, key: str) -> int | None:
        return self._slot_of.get(key)

    def partition_of(self, key: str) -> int | None:
        slot = self._slot_of.get(key)
        return None if slot is None else int(self._partition[slot])

    def live_slots(self) -> np.ndarray:
        return np.fromiter(self._slot_of.values(), dtype=np.int64, count=len(self._slot_of))

    def assign(
        self, keys: Sequence[str], partitions: Sequence[int], now: float
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Slots for distinct ``keys``, allocating (and evicting the LRU key) as needed.

        Returns (slots [U], is_new [U] bool, evicted count). New slots must be :meth:`reset`
        by the caller, batched with its own device work. Keys of this call are never evicted
        by it, so ``len(keys)`` may not exceed capacity.
        """
        if len(keys) > self.capacity:
            raise ValueError(f"{len(keys)} distinct keys in one batch exceed capacity")
        found = list(map(self._slot_of.get, keys))
        is_new = np.zeros(len(keys), dtype=bool)
        missing: list[int] = []
        if None in found:
            missing = [i for i, slot in enumerate(found) if slot is None]
            slots = np.asarray([-1 if s is None else s for s in found], dtype=np.int64)
        else:
            slots = np.asarray(found, dtype=np.int64)
        # Touch known keys first so LRU eviction below cannot pick a key of this batch.
        touch = self._slot_of.move_to_end
        deque(map(touch, keys if not missing else [k for k, s in zip(keys, found, strict=True)
                                                   if s is not None]), maxlen=0)
        evicted = 0
        for i in missing:
            if not self._free:
                gone, victim = self._slot_of.popitem(last=False)
                if self.evictions is not None:
                    self.evictions.append((gone, int(self._partition[victim])))
                self._key_of[victim] = None
                self.dirty[victim] = False
                self._free.append(victim)
                evicted += 1
            slot = self._free.pop()
            self._slot_of[keys[i]] = slot
            self._key_of[slot] = keys[i]
            slots[i] = slot
            is_new[i] = True
        self._partition[slots] = np.asarray(partitions, dtype=np.int64)
        self._last_seen[slots] = now
        self.dirty[slots] = True
        return slots, is_new, evicted

    def reset(self, slots: torch.Tensor) -> None:
        """Zero the state of ``slots`` (device int64 tensor): a new key starts from nothing."""
        self.h[:, slots] = 0.0
        self.c[:, slots] = 0.0
        self.has_prev[slots] = False
        self.stats[slots] = 0.0
        self.count[slots] = 0.0
        self.win_next[slots] = 0
        self.win_len[slots] = 0

    def reset_all(self) -> None:
        """Zero every live key's hidden state but keep its feature memory and window."""
        self.h.zero_()
        self.c.zero_()

    def release(self, keys: Iterable[str]) -> int:
        released = 0
        for key in keys:
            slot = self._slot_of.pop(key, None)
            if slot is not None:
                self._key_of[slot] = None
                self._partition[slot] = -1
                self.dirty[slot] = False
                self._free.append(slot)
                released += 1
        return released

    def release_partitions(self, partitions: Iterable[int]) -> int:
        """Forget every key owned by ``partitions`` (their state moves with the partition)."""
        wanted = np.asarray(sorted(set(partitions)), dtype=np.int64)
        if wanted.size == 0 or not self._slot_of:
            return 0
        live = self.live_slots()
        hit = live[np.isin(self._partition[live], wanted)]
        return self.release([k for k in (self._key_of[s] for s in hit) if k is not None])

    def evict_idle(self, now: float) -> int:
        """Evict keys not seen for ``ttl_s``; the LRU order makes this a walk from the front."""
        if self.ttl_s is None:
            return 0
        cutoff = now - self.ttl_s
        stale: list[str] = []
        for key, slot in self._slot_of.items():
            if self._last_seen[slot] > cutoff:
                break
            stale.append(key)
        if self.evictions is not None:
            self.evictions.extend((k, int(self._partition[self._slot_of[k]])) for k in stale)
        return self.release(stale)

    def keys_of(self, partition: int, dirty_only: bool = False) -> list[str]:
        """Resident keys of ``partition`` (only those changed since the last checkpoint when
        ``dirty_only``)."""
        live = self.live_slots()
        hit = live[self._partition[live] == partition]
        if dirty_only:
            hit = hit[self.dirty[hit]]
        return [k for k in (self._key_of[s] for s in hit) if k is not None]

    def last_seen(self, keys: Sequence[str]) -> np.ndarray:
        return self._last_seen[[self._slot_of[k] for k in keys]]

    def set_last_seen(self, slots: np.ndarray, when: np.ndarray) -> None:
        self._last_seen[slots] = when

    def window_sequences(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each slot's buffered features oldest first: x [S, W, F] (left-aligned), lengths [S]."""
        lengths = self.win_len[slots]
        steps = torch.arange(self.window, device=self.device)
        # Oldest entry sits at (next - len) mod W; walk forward from there.
        pos = (self.win_next[slots, None] - lengths[:, None] + steps[None, :]) % self.window
        return self.win[slots[:, None], pos], lengths
