"""lukv-compile: LU-KV per-head KV-cache eviction as a torch.compile backend with real ragged storage.

    model.compile(backend="lukv", options={"profile": profile, "compression": 0.8})
    model.generate(...)
"""

from lukv_compile import backend, generation
from lukv_compile.cache import LUKVCache, full_cache_nbytes
from lukv_compile.profile import Profile, ProfileError

backend.register()
generation.install()

__all__ = ["LUKVCache", "Profile", "ProfileError", "full_cache_nbytes"]
