"""FX passes of the lukv backend, one per file: find_attention (match), rewrite_attention (lower)."""

from lukv_compile.passes.find_attention import AttentionSite, find_attention_sites
from lukv_compile.passes.rewrite_attention import rewrite_attention

__all__ = ["AttentionSite", "find_attention_sites", "rewrite_attention"]
