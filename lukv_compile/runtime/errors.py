"""What the runtime raises and warns with (public: lukv_compile exports both)."""


class LUKVCacheError(RuntimeError):
    """The cache was used in a way it cannot serve (raised before anything is changed)."""


class LUKVWarning(UserWarning):
    """Something lukv does differently from what the options alone suggest (said once per cache)."""
