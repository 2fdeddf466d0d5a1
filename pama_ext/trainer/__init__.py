"""The small multi-objective PPO trainer of pama_ext.

``pama_ext.trainer.tiny_world`` holds the embedded, download-free default world: a seeded generator of
movie-review-like texts, a word-level tokenizer built on them and a tiny GPT-2 pretrained on them on
CPU, built once and cached (``build_tiny_world()``).

Submodules are imported lazily: importing this package does not import transformers.
"""
