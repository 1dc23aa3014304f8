"""Ragged per-head K/V storage for one layer: each (batch row, KV head) holds only its own tokens.

Layout (docs/architecture.md): one flat `keys` / `values` tensor [S, D] per layer; head (b, h) owns
slots [start[b, h], start[b, h] + cap[b, h]) and its first length[b, h] slots hold its tokens in
sequence order, with each token's original position in `positions` [S]. The segment metadata lives on
the host (numpy), so the CPU kernels slice each head without a device read; `device_metadata()` gives
the same as device tensors for the GPU kernels.

A forked store (`fork_rows`, LUKVCache.fork) reads its past from a `SharedPrefix` that several stores hold
and none writes: head (b, h)'s tokens are its prefix segment [prefix_start, + prefix_length) followed by its
own segment. Appending never touches the prefix; eviction and reordering lay the head out again on its own
(copy on divergence), so N forks of one document hold one document plus N suffixes until they evict.

Storage grows as tokens arrive: when a head is full the layer is laid out again with room for
1/ROOM_SHARE more tokens per head (amortised O(1) per token, never a per-step copy), and eviction
rebuilds it at exactly the kept tokens plus that room. Nothing is reserved up front.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

MIN_ROOM = 16
ROOM_SHARE = 16  # free slots a head gets when laid out: max(MIN_ROOM, its length / ROOM_SHARE)


def room_for(length: np.ndarray) -> np.ndarray:
    return np.maximum(MIN_ROOM, length // ROOM_SHARE)


def starts_of(cap: np.ndarray) -> np.ndarray:
    """Segment starts [B, H] of heads laid out back to back (b-major) with capacities `cap` [B, H]."""
    return (np.cumsum(cap) - cap.reshape(-1)).reshape(cap.shape)


def segment_slots(start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Flat slot indices of every held token, head after head (b-major, then h), in sequence order."""
    start, length = start.reshape(-1), length.reshape(-1)
    if length.sum() == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.arange(length.sum()) - np.repeat(np.cumsum(length) - length, length)
    return np.repeat(start, length) + offsets


class SharedPrefix(NamedTuple):
    """Flat tokens several forked stores read and none writes (see module docstring)."""

    keys: torch.Tensor  # [S, D]
    values: torch.Tensor  # [S, D]
    positions: torch.Tensor  # [S]


class Segments(NamedTuple):
    """Where each head's tokens lie in flat tensors: head (b, h) holds length[b, h] tokens from start[b, h]."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    start: np.ndarray  # [B, H]
    length: np.ndarray  # [B, H]


class RaggedStore:
    """One compressible layer's kept tokens (see module docstring)."""

    def __init__(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.start = np.zeros((batch, heads), dtype=np.int64)
        self.length = np.zeros((batch, heads), dtype=np.int64)
        self.cap = np.zeros((batch, heads), dtype=np.int64)
        self.keys = torch.empty(0, head_dim, dtype=dtype, device=device)
        self.values = torch.empty(0, head_dim, dtype=dtype, device=device)
        self.positions = torch.empty(0, dtype=torch.int32, device=device)
        self._device_metadata = None
        self.share(None, np.zeros((batch, heads), dtype=np.int64), np.zeros((batch, heads), dtype=np.int64))

    @classmethod
    def from_packed(cls, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                    length: np.ndarray) -> RaggedStore:
        """A store holding `length` [B, H] tokens per head, packed head after head (b-major) in the tensors."""
        store = cls(*length.shape, keys.shape[1], keys.dtype, keys.device)
        store._layout([Segments(keys, values, positions.to(torch.int32), starts_of(length), length)],
                      length + room_for(length))
        return store

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def held(self) -> np.ndarray:
        """Tokens each head [B, H] holds: its shared prefix and its own."""
        return self.prefix_length + self.length

    @property
    def num_tokens(self) -> int:
        return int(self.held.sum())

    def own(self) -> Segments:
        return Segments(self.keys, self.values, self.positions, self.start, self.length)

    def shared(self) -> Segments | None:
        """The shared prefix's segments of this store's heads, or None."""
        if self.prefix is None:
            return None
        return Segments(*self.prefix, self.prefix_start, self.prefix_length)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this store keeps alive (a shared prefix too, which its forks count as well)."""
        return [self.keys, self.values, self.positions] + (list(self.prefix) if self.prefix is not None else [])

    def nbytes(self) -> int:
        """Bytes held: every slot's key, value and position (a shared prefix whole), plus the host metadata."""
        return sum(t.numel() * t.element_size() for t in self.tensors()) + self.metadata_nbytes()

    def metadata_nbytes(self) -> int:
        return self.start.nbytes * 5  # start, length, cap and the prefix's start, length

    def share(self, prefix: SharedPrefix | None, start: np.ndarray, length: np.ndarray) -> None:
        """Read `prefix`'s segments start/length [B, H] before each head's own tokens (None, zeros: no prefix)."""
        self.prefix, self.prefix_start, self.prefix_length = prefix, start, length
        self._prefix_device_metadata = None

    def device_metadata(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(start, length) as int64 tensors on the storage's device, for the GPU kernels."""
        if self._device_metadata is None:
            self._device_metadata = (torch.as_tensor(self.start, device=self.device),
                                     torch.as_tensor(self.length, device=self.device))
        return self._device_metadata

    def prefix_device_metadata(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(start, length) of the shared prefix's segments as device tensors (uploaded once per fork, not per
        decode step: appending changes only the own segments)."""
        if self._prefix_device_metadata is None:
            self._prefix_device_metadata = (torch.as_tensor(self.prefix_start, device=self.device),
                                            torch.as_tensor(self.prefix_length, device=self.device))
        return self._prefix_device_metadata

    def head_positions(self, b: int, h: int) -> torch.Tensor:
        return torch.cat([part.positions[int(part.start[b, h]):int(part.start[b, h] + part.length[b, h])]
                          for part in (self.shared(), self.own()) if part is not None])

    def _layout(self, sources: list[Segments], cap: np.ndarray) -> None:
        """Lay the heads out afresh with capacities `cap` [B, H], each holding its tokens from `sources` in order.

        One slice copy per head and source: 2-7x faster than a gather/scatter over every token's slot index
        (benchmarks/bench_regrowth.py), and a decode step pays it whenever some head of the layer runs out of room.
        """
        start = starts_of(cap)
        total = int(cap.sum())
        keys = self.keys.new_zeros(total, self.head_dim)
        values = self.values.new_zeros(total, self.head_dim)
        positions = self.positions.new_full((total,), -1)
        filled = start.copy()
        for src in sources:
            for s, d, n in zip(src.start.reshape(-1).tolist(), filled.reshape(-1).tolist(),
                               src.length.reshape(-1).tolist(), strict=True):
                keys[d:d + n] = src.keys[s:s + n]
                values[d:d + n] = src.values[s:s + n]
                positions[d:d + n] = src.positions[s:s + n]
            filled = filled + src.length
        self.keys, self.values, self.positions = keys, values, positions
        self.start, self.length, self.cap = start, filled - start, cap
        self.batch = cap.shape[0]
        self._device_metadata = None

    def unshare(self) -> None:
        """Hold every token in this store's own storage, the shared prefix no more (before it diverges)."""
        if self.prefix is None:
            return
        held = self.held
        self._layout([self.shared(), self.own()], held + room_for(held))
        self.share(None, np.zeros_like(self.start), np.zeros_like(self.length))

    def packed(self) -> Segments:
        """Every head's tokens in order, head after head (b-major) with no free slots: what a file holds."""
        flat = RaggedStore(self.batch, self.heads, self.head_dim, self.keys.dtype, self.device)
        flat._layout([part for part in (self.shared(), self.own()) if part is not None], self.held)
        return flat.own()

    def fork_rows(self, rows: np.ndarray) -> RaggedStore:
        """A store whose row i continues from this store's row rows[i], sharing its tokens (neither writes them).

        This store's own tokens become the shared prefix too (copied once into one when it already had one)."""
        if self.length.any():
            held = self.held
            if self.prefix is not None:
                self.unshare()
            self.share(SharedPrefix(self.keys, self.values, self.positions), self.start, held)
            self._layout([], np.zeros_like(held))  # own storage empty: it grows afresh as tokens arrive
        fork = RaggedStore(len(rows), self.heads, self.head_dim, self.keys.dtype, self.device)
        fork.share(self.prefix, self.prefix_start[rows], self.prefix_length[rows])
        return fork

    def append(self, k: torch.Tensor, v: torch.Tensor, counts: np.ndarray, first_position: int) -> None:
        """Append the last counts[b] tokens of row b of k/v [B, H, C, D] to every head of that row.

        The chunk's padding is on the left, so a row's real tokens are its last counts[b]; their
        positions are first_position + their index in the chunk.
        """
        b, h, c, _ = k.shape
        grown = self.length + counts[:, None]
        if (grown > self.cap).any():
            # Every head short of half its room is laid out again too: the layer is copied anyway, and
            # heads that would overflow a few steps later then share this copy instead of each making one.
            room = room_for(grown)
            self._layout([self.own()], np.where(grown + room // 2 > self.cap, grown + room, self.cap))
        if c == 1 and (counts == 1).all():  # a decode step: one slot per head, no masks
            self._append_one(k, v, first_position)
            return
        chunk_index = np.arange(c)
        real = chunk_index[None, :] >= (c - counts)[:, None]  # [B, C]
        selected = torch.as_tensor(np.repeat(real[:, None, :], h, axis=1), device=k.device)
        dst = torch.as_tensor(segment_slots(self.start + self.length, np.repeat(counts[:, None], h, axis=1)),
                              device=self.device)
        self.keys[dst] = k[selected].to(self.keys.dtype)
        self.values[dst] = v[selected].to(self.values.dtype)
        token_pos = torch.arange(first_position, first_position + c, device=self.device).expand(b, h, c)
        self.positions[dst] = token_pos[selected].to(self.positions.dtype)
        self.length = grown
        self._device_metadata = None

    def _append_one(self, k: torch.Tensor, v: torch.Tensor, position: int) -> None:
        slots = torch.from_numpy((self.start + self.length).reshape(-1)).to(self.device)
        self.keys.index_copy_(0, slots, k.reshape(-1, self.head_dim).to(self.keys.dtype))
        self.values.index_copy_(0, slots, v.reshape(-1, self.head_dim).to(self.values.dtype))
        self.positions.index_fill_(0, slots, position)
        self.length = self.length + 1
        self._device_metadata = None

    def dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every head's tokens right-aligned in [B, H, T, D] (T = the longest head), for scoring.

        Returns keys, values, positions [B, H, T] (-1 where empty) and valid [B, H, T]. Right alignment
        puts each head's newest token at T - 1, as left padding does for a prompt. Scoring leads to
        eviction, so a forked store first takes its tokens out of the shared prefix.
        """
        self.unshare()
        b, h = self.length.shape
        t = int(self.length.max())
        index = np.zeros((b, h, t), dtype=np.int64)
        valid = np.arange(t)[None, None, :] >= (t - self.length)[:, :, None]
        index[valid] = segment_slots(self.start, self.length)
        index_t = torch.as_tensor(index, device=self.device)
        valid_t = torch.as_tensor(valid, device=self.device)
        keys = self.keys[index_t].masked_fill_(~valid_t[..., None], 0)
        values = self.values[index_t].masked_fill_(~valid_t[..., None], 0)
        positions = self.positions[index_t].masked_fill_(~valid_t, -1)
        return keys, values, positions, valid_t

    def replace(self, selected: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                positions: torch.Tensor) -> None:
        """Hold exactly the `selected` [B, H, T] tokens of dense keys/values/positions [B, H, T(, D)], in order.

        The layer is rebuilt at the kept tokens plus room: the evicted tokens' memory is freed.
        """
        if self.prefix is not None:
            raise RuntimeError("replace() on a store that still shares a prefix: dense() unshares it first")
        kept = selected.sum(dim=-1).cpu().numpy().astype(np.int64)
        cap = kept + room_for(kept)
        start = starts_of(cap)
        dst = torch.as_tensor(segment_slots(start, kept), device=self.device)
        total = int(cap.sum())
        self.keys = self.keys.new_zeros(total, self.head_dim).index_copy_(0, dst, keys[selected].to(self.keys.dtype))
        self.values = self.values.new_zeros(total, self.head_dim).index_copy_(
            0, dst, values[selected].to(self.values.dtype))
        self.positions = self.positions.new_full((total,), -1).index_copy_(
            0, dst, positions[selected].to(self.positions.dtype))
        self.start, self.length, self.cap = start, kept, cap
        self._device_metadata = None

    def select_rows(self, rows: np.ndarray) -> None:
        """Row i becomes a copy of row rows[i] (beam search reordering): whole segments move, metadata too.

        A shared prefix stays shared: only which of its segments each row reads changes."""
        length = self.length[rows]
        self._layout([Segments(self.keys, self.values, self.positions, self.start[rows], length)],
                     length + room_for(length))
        self.share(self.prefix, self.prefix_start[rows], self.prefix_length[rows])
