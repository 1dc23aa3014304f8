"""FX passes of the lukv backend, one per file: find (match), then rewrite (lower).

find_attention / rewrite_attention: attention whose K/V come from a LUKVCache (transformers models);
find_buffer_attention / rewrite_buffer_attention: attention over a model's own dense KV buffers (gpt-fast).
"""

from lukv_compile.passes.find_attention import AttentionSite, UnsupportedAttention, find_attention_sites
from lukv_compile.passes.find_buffer_attention import BufferSite, find_buffer_attention
from lukv_compile.passes.rewrite_attention import rewrite_attention
from lukv_compile.passes.rewrite_buffer_attention import rewrite_buffer_attention

__all__ = ["AttentionSite", "BufferSite", "UnsupportedAttention", "find_attention_sites", "find_buffer_attention",
           "rewrite_attention", "rewrite_buffer_attention"]
