"""Ragged per-head K/V storage for one layer: each (batch row, KV head) holds only its own tokens.

Layout (docs/architecture.md): one flat `keys` / `values` tensor [S, D] per layer; head (b, h) owns
slots [start[b, h], start[b, h] + cap[b, h]) and its first length[b, h] slots hold its tokens in
sequence order, with each token's original position in `positions` [S]. The segment metadata lives on
the host (numpy), so the CPU kernels slice each head without a device read; `device_metadata()` gives
the same as device tensors for the GPU kernels.

Storage grows as tokens arrive: when a head is full the layer is laid out again with room for
1/ROOM_SHARE more tokens per head (amortised O(1) per token, never a per-step copy), and eviction
rebuilds it at exactly the kept tokens plus that room. Nothing is reserved up front.
"""

from __future__ import annotations

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

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def num_tokens(self) -> int:
        return int(self.length.sum())

    def nbytes(self) -> int:
        """Bytes held: every slot's key, value and position, plus the host segment metadata."""
        tensors = (self.keys, self.values, self.positions)
        return sum(t.numel() * t.element_size() for t in tensors) + self.start.nbytes * 3

    def device_metadata(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(start, length) as int64 tensors on the storage's device, for the GPU kernels."""
        if self._device_metadata is None:
            self._device_metadata = (torch.as_tensor(self.start, device=self.device),
                                     torch.as_tensor(self.length, device=self.device))
        return self._device_metadata

    def head_positions(self, b: int, h: int) -> torch.Tensor:
        s = int(self.start[b, h])
        return self.positions[s:s + int(self.length[b, h])]

    def _move(self, src_start: np.ndarray, length: np.ndarray, cap: np.ndarray) -> None:
        """Copy the `length` [B, H] tokens at slots `src_start` into fresh buffers laid out with capacities `cap`.

        One slice copy per head: 2-7x faster than a gather/scatter over every token's slot index
        (benchmarks/bench_regrowth.py), and a decode step pays it whenever some head of the layer runs out of room.
        """
        start = starts_of(cap)
        total = int(cap.sum())
        keys = self.keys.new_zeros(total, self.head_dim)
        values = self.values.new_zeros(total, self.head_dim)
        positions = self.positions.new_full((total,), -1)
        for src, dst, n in zip(src_start.reshape(-1).tolist(), start.reshape(-1).tolist(), length.reshape(-1).tolist(),
                               strict=True):
            keys[dst:dst + n] = self.keys[src:src + n]
            values[dst:dst + n] = self.values[src:src + n]
            positions[dst:dst + n] = self.positions[src:src + n]
        self.keys, self.values, self.positions = keys, values, positions
        self.start, self.length, self.cap = start, length, cap
        self.batch = length.shape[0]
        self._device_metadata = None

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
            self._move(self.start, self.length, np.where(grown + room // 2 > self.cap, grown + room, self.cap))
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
        puts each head's newest token at T - 1, as left padding does for a prompt.
        """
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
        """Row i becomes a copy of row rows[i] (beam search reordering): whole segments move, metadata too."""
        length = self.length[rows]
        self._move(self.start[rows], length, length + room_for(length))
