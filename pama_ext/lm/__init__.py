"""The language-model toolkit shared by the PPO trainer (:mod:`pama_ext.trainer`) and the preference
trainer (:mod:`pama_ext.dpo`):

- :mod:`.config`: dataclass configs as flags and YAML keys (``option``, ``load_config``, ``ConfigError``);
- :mod:`.files`: crash-safe run directories (atomic writes, output-dir preparation, cleanup on failure);
- :mod:`.checkpoint`: crash-safe, verified checkpoints and RNG states (``--resume`` of both trainers);
- :mod:`.hf`: Hugging Face loading (``load_lm``, ``load_tokenizer``, ``check_pretrained``, ``hf_quiet``);
- :mod:`.prompts`: prompt files; :mod:`.seeding`: ``derive_seed``, ``seed_everything``, ``EpochSampler``;
- :mod:`.policy`: a causal LM with value heads; :mod:`.rollout`: generation and scoring;
- :mod:`.rewards`: the objectives (reward functions); :mod:`.plots`: matplotlib and PNG writes.

Submodules are imported lazily: importing this package does not import torch or transformers.
"""
