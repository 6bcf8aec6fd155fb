"""The DeepSeek-VL2 runtime: transformers 5 classes composed into Tiny, Small and base."""

import os

# ideep, PyTorch's wrapper around oneDNN for CPU bf16 products, keeps an LRU cache of 1,024
# computations keyed by matrix shape. A routed expert's shape changes with the tokens it gets, so
# every new prompt added entries: full-size Tiny's resident memory grew by 560 MB over 12 prefills
# of different lengths, 240 MB of it this cache, with no speed gained from it (3.0 ms a prompt
# token either way, measured). oneDNN's own primitive cache, which does save time (4.3 ms a token
# without it), is left as it is. ideep reads the variable at its first product, so it is set on
# import, before any; a value the user set wins.
os.environ.setdefault("LRU_CACHE_CAPACITY", "1")
