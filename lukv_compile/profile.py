"""The Profile file: per-head prune fractions for every global compression ratio.

A profile is the only thing the offline solver hands to inference. It holds an array
`prune[99, num_layers, num_kv_heads]` (kvpress's LU-KV shape): row i is the solution at global
compression ratio (i + 1) / 100, and `prune[i, l, g]` is the fraction of head (l, g)'s context that is
evicted. Fractions make it length-independent: at run time `keep = (1 - r) * T`. Layers the cache
leaves exact (sliding-window) are listed in `excluded_layers`, hold prune 0 and are never applied.

On disk: one safetensors file with the tensor `prune_fractions` and a JSON metadata header saying which
model, scorer, sink and window it was made for. Inference refuses a mismatch.

A profile's `scorer` names the ranking its loss curves measured: a run-time scorer (lukv_compile/policy/scorers/),
or `reconstruction` (profiling/reconstruction.py), which only `compress_context` applies: a cache holding
such a profile is filled by that call and never evicts on its own.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from lukv_compile.policy.scorers import DEFAULT_WINDOW as SCORER_WINDOW
from lukv_compile.policy.scorers import SCORERS as SCORERS  # re-exported: callers import the names from here too

FORMAT_VERSION = 1
NUM_RATIOS = 99
DEFAULT_SINK = 4
REQUIRED_METADATA = ("format_version", "scorer", "sink", "window", "num_layers", "num_kv_heads")
RECONSTRUCTION = "reconstruction"  # a ranking, not a run-time scorer: applied by compress_context only
RANKINGS = SCORERS + (RECONSTRUCTION,)  # what a profile can be made for
DEFAULT_WINDOW = SCORER_WINDOW | {RECONSTRUCTION: 1}  # protected recent tokens per ranking (the last token)


def check_ranking(name: str) -> str:
    if name not in RANKINGS:
        raise ValueError(f"unknown scorer {name!r}; allowed: {', '.join(RANKINGS)}")
    return name


class ProfileError(ValueError):
    """A profile file is unreadable, corrupt, or does not fit the model it is used with."""


def check_compression(compression: float) -> float:
    if not isinstance(compression, numbers.Real) or isinstance(compression, bool) or not 0.0 <= compression < 1.0:
        raise ValueError(f"compression must be a number in [0, 1) (0.8 keeps 20%), got {compression!r}")
    return float(compression)


def ratio_row(compression: float) -> int:
    """Row of the profile used for `compression`, as LU-KV looks it up: round(100 * rho) - 1, clamped."""
    return min(max(round(100 * compression) - 1, 0), NUM_RATIOS - 1)


@dataclass
class Profile:
    prune: np.ndarray  # [99, L, H_kv] float32 prune fractions in [0, 1)
    scorer: str = "snapkv"
    sink: int = DEFAULT_SINK
    window: int = 32
    model: dict = field(default_factory=dict)  # identity: model_type, layers, heads, ... (may be empty)
    fingerprint: str = ""  # config fingerprint of the model the profile was made on ("" = any)
    calibration: str = ""  # how the profile was made
    scope: str = "global"
    excluded_layers: tuple[int, ...] = ()  # layers left out of the budget (sliding-window, left exact): prune 0

    def __post_init__(self) -> None:
        self.prune = np.asarray(self.prune, dtype=np.float32)
        if self.prune.ndim != 3 or self.prune.shape[0] != NUM_RATIOS:
            raise ProfileError(f"prune fractions must have shape [99, layers, kv_heads], got {self.prune.shape}")
        if not np.isfinite(self.prune).all() or self.prune.min() < 0 or self.prune.max() >= 1:
            raise ProfileError("prune fractions must be finite and in [0, 1)")
        check_ranking(self.scorer)
        for name in ("sink", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ProfileError(f"profile {name} must be an int >= 0, got {value!r}")
        self.excluded_layers = tuple(sorted(set(self.excluded_layers)))
        if any(not isinstance(x, int) or not 0 <= x < self.num_layers for x in self.excluded_layers):
            raise ProfileError(f"excluded layers must be layer indices 0..{self.num_layers - 1}, "
                               f"got {list(self.excluded_layers)}")
        if self.prune[:, list(self.excluded_layers)].any():
            raise ProfileError("excluded layers must have prune fraction 0 (they get no budget)")

    @property
    def num_layers(self) -> int:
        return self.prune.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.prune.shape[2]

    @classmethod
    def uniform(
        cls, num_layers: int, num_kv_heads: int, scorer: str = "snapkv", sink: int = DEFAULT_SINK,
        window: int | None = None,
    ) -> Profile:
        """Every head keeps the same fraction (the SnapKV-style uniform allocation)."""
        ratios = np.arange(1, NUM_RATIOS + 1, dtype=np.float32) / 100
        prune = np.broadcast_to(ratios[:, None, None], (NUM_RATIOS, num_layers, num_kv_heads)).copy()
        window = DEFAULT_WINDOW[check_ranking(scorer)] if window is None else window
        return cls(prune, scorer=scorer, sink=sink, window=window, calibration="uniform", scope="uniform")

    @classmethod
    def pyramid(
        cls, num_layers: int, num_kv_heads: int, scorer: str = "snapkv", sink: int = DEFAULT_SINK,
        window: int | None = None,
    ) -> Profile:
        """PyramidKV: the keep fraction falls linearly with depth (1.5x to 0.5x the mean), same total."""
        keep_mean = 1 - np.arange(1, NUM_RATIOS + 1, dtype=np.float64) / 100
        slope = np.linspace(1.5, 0.5, num_layers) if num_layers > 1 else np.ones(1)
        keep = np.clip(keep_mean[:, None] * slope[None, :], 0.0, 1.0)
        # Clipping at 1 loses budget in the shallow layers; hand it back evenly to the others.
        keep += (keep_mean[:, None] - keep.mean(axis=1, keepdims=True)) * (keep < 1.0)
        prune = np.clip(1 - keep, 0.0, 0.999)[:, :, None].repeat(num_kv_heads, axis=2)
        window = DEFAULT_WINDOW[check_ranking(scorer)] if window is None else window
        return cls(prune.astype(np.float32), scorer=scorer, sink=sink, window=window,
                   calibration="pyramidkv linear", scope="pyramid")

    def floored(self, share: float) -> Profile:
        """Every compressed head keeps at least `share` of the uniform keep fraction, same total per ratio.

        keep' = share * (1 - rho) + (1 - share) * keep for each ratio rho: a blend with uniform, so each
        layer's total is unchanged and a head the profile starves still holds `share` of an even split.
        """
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"floor share must be in [0, 1], got {share!r}")
        rho = (np.arange(1, NUM_RATIOS + 1, dtype=np.float64) / 100)[:, None, None]
        keep = share * (1 - rho) + (1 - share) * (1 - self.prune.astype(np.float64))
        prune = np.clip(1 - keep, 0.0, 0.999)
        prune[:, list(self.excluded_layers)] = 0.0
        return replace(self, prune=prune.astype(np.float32), scope=f"{self.scope}, floored {share:g}")

    def fractions(self, compression: float) -> np.ndarray:
        """Prune fractions [L, H_kv] for a global compression ratio; compression 0 keeps everything."""
        if check_compression(compression) == 0.0:
            return np.zeros(self.prune.shape[1:], dtype=np.float32)
        return self.prune[ratio_row(compression)]

    def check_model(self, num_layers: int, num_kv_heads: int, fingerprint: str = "") -> None:
        """Refuse a profile that was made for another model shape (or, if both are known, another model)."""
        if (num_layers, num_kv_heads) != (self.num_layers, self.num_kv_heads):
            raise ProfileError(
                f"profile is for {self.num_layers} layers x {self.num_kv_heads} KV heads, "
                f"but the model has {num_layers} layers x {num_kv_heads} KV heads (a profile's shape must match "
                "the model's, even with allow_other_model=True)"
            )
        if self.fingerprint and fingerprint and self.fingerprint != fingerprint:
            raise ProfileError(
                f"profile was made for model fingerprint {self.fingerprint[:12]}..., "
                f"this model's is {fingerprint[:12]}... ({self.model.get('name', 'unknown model')}); pass "
                "allow_other_model=True to use it anyway"
            )

    def metadata(self) -> dict:
        return {
            "format_version": FORMAT_VERSION, "scorer": self.scorer, "sink": self.sink, "window": self.window,
            "model": self.model, "fingerprint": self.fingerprint, "calibration": self.calibration,
            "scope": self.scope, "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
            "excluded_layers": list(self.excluded_layers),
        }

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensor = torch.from_numpy(np.ascontiguousarray(self.prune))
        save_file({"prune_fractions": tensor}, str(path), metadata={"lukv": json.dumps(self.metadata())})

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"{path}: no such profile file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["lukv"])
                prune = f.get_tensor("prune_fractions").numpy()
        except (KeyError, json.JSONDecodeError) as e:
            raise ProfileError(f"{path}: not a lukv profile (missing or bad metadata: {e})") from e
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise ProfileError(f"{path}: corrupt or truncated profile file ({e})") from e
        if not isinstance(meta, dict):
            raise ProfileError(f"{path}: its lukv metadata is not a JSON object")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ProfileError(f"{path}: format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
        missing = [key for key in REQUIRED_METADATA if key not in meta]
        if missing:
            raise ProfileError(f"{path}: metadata lacks {', '.join(missing)} "
                               f"(required: {', '.join(REQUIRED_METADATA)})")
        if prune.shape[1:] != (meta["num_layers"], meta["num_kv_heads"]):
            raise ProfileError(f"{path}: tensor shape {prune.shape} does not match its metadata")
        try:
            return cls(prune, scorer=meta["scorer"], sink=meta["sink"], window=meta["window"],
                       model=meta.get("model", {}), fingerprint=meta.get("fingerprint", ""),
                       calibration=meta.get("calibration", ""), scope=meta.get("scope", "global"),
                       excluded_layers=tuple(meta.get("excluded_layers", ())))
        except (ValueError, TypeError) as e:
            raise ProfileError(f"{path}: {e}") from e

    @classmethod
    def from_kvpress_npy(cls, path: str | Path, scorer: str, sink: int = DEFAULT_SINK,
                         window: int | None = None) -> Profile:
        """Import kvpress's LUKVPress `.npy` ([99, L, H_kv] prune fractions); the .npy carries no metadata."""
        try:
            prune = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ProfileError(f"{path}: not a readable .npy array ({e})") from e
        window = DEFAULT_WINDOW[check_ranking(scorer)] if window is None else window
        try:
            return cls(prune, scorer=scorer, sink=sink, window=window, calibration=f"imported from {Path(path).name}")
        except ProfileError as e:
            raise ProfileError(f"{path}: {e}") from e

    def to_kvpress_npy(self, path: str | Path) -> None:
        np.save(path, self.prune.astype(np.float32))
