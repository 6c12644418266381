def actor_cache(fn=None, **kw): return fn
