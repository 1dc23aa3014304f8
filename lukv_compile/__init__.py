"""lukv-compile: LU-KV per-head KV-cache eviction as a torch.compile backend with real ragged storage.

    compiled = torch.compile(model, backend="lukv", options={"profile": profile, "compression": 0.8})
    compiled.generate(...)

A later process starts warm (inductor's compiled code from a file): `warm_start(model)` before the first
compiled call, `save_warm_start(model)` after it (lukv_compile/warm.py).
"""

from lukv_compile import backend, hooks
from lukv_compile.cache import LUKVCache, LUKVCacheError, full_cache_nbytes
from lukv_compile.profile import Profile, ProfileError
from lukv_compile.profiling.reconstruction import repeat_ids
from lukv_compile.reconstruction import compress_context
from lukv_compile.settings import LUKVSettings
from lukv_compile.warm import save_warm_start, warm_start

backend.register()
hooks.install()

__all__ = ["LUKVCache", "LUKVCacheError", "LUKVSettings", "Profile", "ProfileError", "compress_context",
           "full_cache_nbytes", "repeat_ids", "save_warm_start", "warm_start"]
