"""Radix prefix cache: longest-prefix match, split, LRU leaf eviction, counters (payload = token ids)."""

import torch

from treedistill.engine.prefix_cache import PrefixCache


def _kv(tokens):
    """Payload whose token axis (-1) holds the token ids themselves: a hit can be checked by value."""
    return lambda a, b: torch.tensor(tokens[a:b], dtype=torch.float32)[None, :]


def _insert(cache, tokens):
    return cache.insert(tokens, _kv(tokens))


def test_match_returns_longest_cached_prefix_and_its_payload():
    cache = PrefixCache(100, token_axis=-1)
    assert _insert(cache, [1, 2, 3, 4]) == 4
    hit = cache.match([1, 2, 3, 9, 9])
    assert hit.length == 3 and hit.kv[0].tolist() == [1, 2, 3]
    assert cache.match([7]).length == 0 and cache.match([7]).kv is None
    # limit caps the match (the engine keeps the last prefix token to recompute its logits)
    assert cache.match([1, 2, 3, 4], limit=2).kv[0].tolist() == [1, 2]


def test_insert_computes_only_the_uncached_tail_and_splits_edges():
    cache = PrefixCache(100, token_axis=-1)
    _insert(cache, [1, 2, 3, 4])
    asked = []

    def kv_of(a, b):
        asked.append((a, b))
        return _kv([1, 2, 5, 6])(a, b)

    assert cache.insert([1, 2, 5, 6], kv_of) == 2
    assert asked == [(2, 4)]  # only tokens 5, 6 are new
    assert cache.size == 6  # 1 2 | 3 4 | 5 6 : the split edge holds no duplicate
    assert cache.match([1, 2, 5, 6]).kv[0].tolist() == [1, 2, 5, 6]
    assert cache.match([1, 2, 3, 4]).kv[0].tolist() == [1, 2, 3, 4]
    assert _insert(cache, [1, 2]) == 0


def test_eviction_drops_least_recently_used_leaves_and_keeps_shared_root():
    cache = PrefixCache(8, token_axis=-1)
    _insert(cache, [1, 2, 3, 4, 5, 6])    # root prompt 1 2 3 4 + child 5 6
    _insert(cache, [1, 2, 3, 4, 7, 8])    # child 7 8 -> 8 tokens: at the bound
    cache.match([1, 2, 3, 4, 5, 6])       # touch child 5 6: 7 8 is now the coldest leaf
    _insert(cache, [1, 2, 3, 4, 9, 10])   # 10 tokens > 8: evict 7 8
    assert cache.size == 8
    assert cache.match([1, 2, 3, 4, 7, 8]).length == 4  # shared prefix survives, cold child gone
    assert cache.match([1, 2, 3, 4, 5, 6]).length == 6
    assert cache.stats.evicted_tokens == 2 and cache.stats.inserted_tokens == 10


def test_eviction_cascades_to_parents_that_become_leaves():
    cache = PrefixCache(3, token_axis=-1)
    _insert(cache, [1, 2])
    _insert(cache, [1, 2, 3])  # 3 tokens
    _insert(cache, [4, 5, 6])  # 6 > 3: the [1 2]+[3] chain is older; both go
    assert cache.size == 3 and cache.match([1, 2, 3]).length == 0


def test_zero_budget_stores_nothing_and_clear_releases_everything():
    assert _insert(PrefixCache(0, token_axis=-1), [1, 2]) == 0
    cache = PrefixCache(10, token_axis=-1)
    _insert(cache, [1, 2, 3])
    cache.clear()
    assert cache.size == 0 and cache.match([1, 2, 3]).length == 0


def test_served_counter_adds_up():
    cache = PrefixCache(10, token_axis=-1)
    _insert(cache, [1, 2, 3])
    cache.match([1, 2, 3, 4])
    cache.match([1, 2, 9])
    assert cache.stats.served_tokens == 3 + 2
