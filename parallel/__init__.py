"""Parallelism beyond ZeRO data parallelism, applied to a plain model from outside it.

The model file (pretrain/model.py) holds no distributed code; this package splits its layers
across ranks with DeepSpeed's own machinery: tensor parallelism (`tensor.py`), DeepSpeed-Ulysses
sequence parallelism (`sequence.py`), expert parallelism for mixture-of-experts blocks
(`experts.py`), and the degrees of all of them (`config.py`). It imports only `lmforge/`, so
`pretrain/` (the engine and loop) applies it and nothing here knows the training loop.
"""
