"""Compressed caches on disk: `cache.save(path)` / `LUKVCache.load(path, model)` (safetensors).

A file holds what a cache needs to continue, and no more than the cache holds: every compressible head's
kept K/V packed head after head with their true positions and counts (`layers.{i}.keys` [N, D], `.values`,
`.positions` [N], `.lengths` [B, H]), each sliding-window layer's window (`layers.{i}.keys` [B, H, W, D],
`.values`), the profile's prune fractions (`profile.prune`) and, when given, the token ids seen
(`token_ids` [B, T]). The `lukv_cache` metadata (JSON) holds the format version, the model's identity
(config and weights fingerprints, KV shape, layer kinds), the settings, the profile's metadata, each layer's
counters and a sha256 over every tensor: a corrupt file is refused by the checksum, a truncated one by
safetensors, and every refusal names the file and what is wrong. docs/profile-format.md describes it too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from transformers.cache_utils import Cache

from lukv_compile.config import config_fingerprint, kv_shape, text_config, weights_fingerprint
from lukv_compile.profile import Profile
from lukv_compile.runtime.errors import LUKVCacheError
from lukv_compile.runtime.layer import RaggedLayer
from lukv_compile.runtime.storage import RaggedStore
from lukv_compile.settings import LUKVSettings

FORMAT = "lukv-cache"
VERSION = 1
SAVED_SETTINGS = ("compression", "policy", "evict", "prefill_chunk")  # the cache's policy besides its profile


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_cache(cache: Cache, path: Path, token_ids: torch.Tensor | None) -> None:
    model = cache.model() if cache.model is not None else None
    if model is None:
        raise LUKVCacheError("this LUKVCache has served no model yet (or the model is gone): save it after a "
                             "compiled forward, generate or compress_context has filled it")
    tensors, layers = layer_tensors(cache)
    seen = max((layer["seen"] for layer in layers), default=0)
    if token_ids is not None:
        token_ids = torch.as_tensor(token_ids).cpu()
        batch = cache.batch_size
        if token_ids.dim() != 2 or token_ids.shape[1] < seen or (batch is not None and token_ids.shape[0] != batch):
            raise ValueError(f"token_ids must be the [batch={batch}, >= {seen}] tokens of the sequences so far (the "
                             f"{seen} this cache has seen, then any not yet fed, as generate returns them), got shape "
                             f"{tuple(token_ids.shape)}")
        tensors["token_ids"] = token_ids.long()
    tensors["profile.prune"] = torch.from_numpy(np.ascontiguousarray(cache.profile.prune))
    header = {
        "format": FORMAT, "version": VERSION, "fingerprint": config_fingerprint(cache.config),
        "weights": weights_fingerprint(model), "kv_shape": list(cache.shape), "kinds": list(cache.kinds),
        "settings": {name: getattr(cache.settings, name) for name in SAVED_SETTINGS},
        "profile": cache.profile.metadata(), "layers": layers, "checksum": checksum(tensors),
        "shard": None if cache.shard is None else [cache.shard.start, cache.shard.stop, cache.shard.total],
    }
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"lukv_cache": json.dumps(header)})


def layer_tensors(cache: Cache) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Every layer's tensors (CPU, packed) and counters."""
    tensors, layers = {}, []
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, RaggedLayer):
            layers.append({"seen": layer.seen, "real_tokens": layer.real_tokens.tolist()})
            if layer.store is not None:
                packed = layer.store.packed()
                tensors |= {f"layers.{i}.keys": packed.keys.cpu(), f"layers.{i}.values": packed.values.cpu(),
                            f"layers.{i}.positions": packed.positions.cpu(),
                            f"layers.{i}.lengths": torch.from_numpy(packed.length.copy())}
        else:
            layers.append({"seen": layer.cumulative_length})
            if layer.keys is not None and layer.keys.numel():
                tensors |= {f"layers.{i}.keys": layer.keys.contiguous().cpu(),
                            f"layers.{i}.values": layer.values.contiguous().cpu()}
    return tensors, layers


def read_file(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not path.is_file():
        raise LUKVCacheError(f"{path}: no such cache file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise LUKVCacheError(f"{path}: corrupt or truncated cache file ({e})") from e
    try:
        header = json.loads(metadata["lukv_cache"])
    except (KeyError, json.JSONDecodeError) as e:
        raise LUKVCacheError(f"{path}: not a lukv cache file (missing or bad lukv_cache metadata: {e})") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise LUKVCacheError(f"{path}: not a lukv cache file (its metadata names no format {FORMAT!r})")
    if header.get("version") != VERSION:
        raise LUKVCacheError(f"{path}: cache file version {header.get('version')}, this lukv reads version {VERSION}")
    if header.get("checksum") != checksum(tensors):
        raise LUKVCacheError(f"{path}: its tensors do not match the checksum they were saved with: the file is "
                             "corrupt")
    return header, tensors


def check_identity(path: Path, header: dict, config, allow_other_model: bool) -> None:
    shape = tuple(header["kv_shape"])
    if shape != kv_shape(config):
        raise LUKVCacheError(f"{path}: saved from a model with KV shape (layers, KV heads, head_dim) {shape}, this "
                             f"model's is {kv_shape(config)}")
    theirs = config_fingerprint(config)
    if header["fingerprint"] != theirs and not allow_other_model:
        raise LUKVCacheError(f"{path}: saved from a model with config fingerprint {header['fingerprint'][:12]}..., "
                             f"this model's is {theirs[:12]}...; pass allow_other_model=True to use it anyway")


def load_cache(cache_class: type[Cache], path: Path, model, allow_other_model: bool,
               device: torch.device | str | None) -> Cache:
    """A `cache_class` (LUKVCache) cache filled from `path` (this module does not import the class: it imports us)."""
    header, tensors = read_file(path)
    module = model if isinstance(model, torch.nn.Module) else None
    config = text_config(module.config if module is not None else model)
    try:
        check_identity(path, header, config, allow_other_model)
        meta = header["profile"]
        profile = Profile(tensors.pop("profile.prune").numpy(), scorer=meta["scorer"], sink=meta["sink"],
                          window=meta["window"], model=meta["model"], fingerprint=meta["fingerprint"],
                          calibration=meta["calibration"], scope=meta["scope"],
                          excluded_layers=tuple(meta["excluded_layers"]))
        settings = LUKVSettings(profile=profile, allow_other_model=allow_other_model, **header["settings"])
        cache = cache_class(config, settings)
        if list(cache.kinds) != header["kinds"]:
            raise LUKVCacheError(f"{path}: saved with layer kinds {header['kinds']}, this model's are {cache.kinds}")
        if device is None:
            device = next(module.parameters()).device if module is not None else "cpu"
        cache.weights = "" if allow_other_model else header["weights"]
        if module is not None:
            cache.meet_model(module)  # other weights refused now, not at the first forward; its KV heads taken
        check_shard(path, header.get("shard"), cache)
        fill_layers(path, cache, header["layers"], tensors, torch.device(device))
    except (KeyError, TypeError) as e:
        raise LUKVCacheError(f"{path}: its metadata or tensors are incomplete ({type(e).__name__}: {e})") from e
    cache.token_ids = tensors.get("token_ids")
    return cache


def check_shard(path: Path, saved: list[int] | None, cache: Cache) -> None:
    """A tensor-parallel rank's file holds that rank's KV heads: it loads only on a rank holding the same ones."""
    here = None if cache.shard is None else [cache.shard.start, cache.shard.stop, cache.shard.total]
    if saved != here:
        raise LUKVCacheError(f"{path}: saved with KV heads {saved or 'all'} (start, stop, of), but this model "
                             f"{'is not tensor-parallel' if here is None else f'holds {here} here'}; load each "
                             "rank's file on the rank that saved it (and a config alone cannot tell: pass the model)")


def fill_layers(path: Path, cache: Cache, layers: list[dict], tensors: dict[str, torch.Tensor],
                device: torch.device) -> None:
    if len(layers) != len(cache.layers):
        raise LUKVCacheError(f"{path}: holds {len(layers)} layers, the model has {len(cache.layers)}")
    for i, (layer, saved) in enumerate(zip(cache.layers, layers, strict=True)):
        found = {name.rsplit(".", 1)[1]: tensors.pop(name) for name in list(tensors)
                 if name.startswith(f"layers.{i}.")}
        if isinstance(layer, RaggedLayer):
            layer.seen, layer.real_tokens = saved["seen"], np.array(saved["real_tokens"], dtype=np.int64)
            if found:
                layer.store = checked_store(path, i, found, layer, device)
        elif found:
            layer.lazy_initialization(found["keys"].to(device), found["values"].to(device))
            layer.keys, layer.values = found["keys"].to(device), found["values"].to(device)
            layer.cumulative_length = saved["seen"]
    unknown = sorted(set(tensors) - {"token_ids"})
    if unknown:
        raise LUKVCacheError(f"{path}: holds tensors this model has no place for: {', '.join(unknown)}")


def checked_store(path: Path, i: int, found: dict[str, torch.Tensor], layer: RaggedLayer,
                  device: torch.device) -> RaggedStore:
    """Layer i's store from its saved tensors, after checking they describe a valid one."""
    keys, values, positions, lengths = (found[name] for name in ("keys", "values", "positions", "lengths"))
    length = lengths.numpy().astype(np.int64)
    where = f"{path}: layer {i}"
    if length.ndim != 2 or length.shape[1] != layer.kv_heads or (length < 0).any():
        raise LUKVCacheError(f"{where}: token counts of shape {tuple(length.shape)}, expected [batch, "
                             f"{layer.kv_heads}] counts >= 0")
    rows = int(length.sum())
    if keys.shape != (rows, layer.head_dim) or values.shape != keys.shape or positions.shape != (rows,):
        raise LUKVCacheError(f"{where}: keys {tuple(keys.shape)} / values {tuple(values.shape)} / positions "
                             f"{tuple(positions.shape)} do not hold the {rows} tokens of head_dim {layer.head_dim} "
                             "its counts say")
    if len(layer.real_tokens) != length.shape[0]:
        raise LUKVCacheError(f"{where}: {length.shape[0]} rows but {len(layer.real_tokens)} context lengths")
    first = np.zeros(rows, dtype=bool)
    first[(np.cumsum(length.reshape(-1)) - length.reshape(-1))[length.reshape(-1) > 0]] = True
    ascending = (np.diff(positions.numpy()) > 0) | first[1:]
    if rows and (not ascending.all() or positions.min() < 0 or positions.max() >= layer.seen):
        raise LUKVCacheError(f"{where}: token positions are not ascending within [0, {layer.seen}) per head")
    return RaggedStore.from_packed(keys.to(device), values.to(device), positions.to(device), length)
