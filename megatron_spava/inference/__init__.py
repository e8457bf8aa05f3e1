"""Prefill and decode with a distributed KV cache (SPAVA.md section 4)."""

from .kv_cache import DistributedKVCache, cache_rows

__all__ = ["DistributedKVCache", "cache_rows"]
