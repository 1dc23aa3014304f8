"""lukv-compile: LU-KV per-head KV-cache eviction as a torch.compile backend with real ragged storage.

    compiled = torch.compile(model, backend="lukv", options={"profile": profile, "compression": 0.8})
    compiled.generate(...)

Importing this package changes nothing in torch, transformers or the environment: torch finds the `lukv`
backend through the package's entry point, and lukv's hooks go in when torch first looks it up
(compiler/entry.py, compat.py). A later process starts warm (inductor's compiled code from a file):
`warm_start(model)` before the first compiled call, `save_warm_start(model)` after it.
"""

from lukv_compile.compiler.forward import CompileLimitError, buffer_cache
from lukv_compile.compiler.warm_start import save_warm_start, warm_start
from lukv_compile.profile import Profile, ProfileError
from lukv_compile.profiling.reconstruction import repeat_ids
from lukv_compile.runtime.cache import LUKVCache, full_cache_nbytes, nbytes_together
from lukv_compile.runtime.compress_context import compress_context
from lukv_compile.runtime.errors import LUKVCacheError, LUKVWarning
from lukv_compile.runtime.questions import questions_batch
from lukv_compile.settings import LUKVSettings

__all__ = ["CompileLimitError", "LUKVCache", "LUKVCacheError", "LUKVSettings", "LUKVWarning", "Profile",
           "ProfileError", "buffer_cache", "compress_context", "full_cache_nbytes", "nbytes_together",
           "questions_batch", "repeat_ids", "save_warm_start", "warm_start"]
