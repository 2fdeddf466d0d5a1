"""Preference-data alignment for pama_ext (``pama-ext dpo``): raco, cagrad, dpo-lw, modpo and mopo.

- :mod:`.data`: the JSONL format and its loaders, tiny-world pairs judged by the objectives, MOPO pools;
- :mod:`.readers`: the published label-only schemas (PKU-SafeRLHF, HH-RLHF, HelpSteer, UltraFeedback,
  RACO pairs);
- :mod:`.mopo`: MOPO's tilt, robust bound and dual updates (tensor code, on device);
- :mod:`.methods`: the per-step updates of every method (through the pama_ext preference ops);
- :mod:`.train`: ``train_dpo(config)`` and the ``dpo`` subcommand; :mod:`.config`: its settings;
- :mod:`.evaluate`: win rates against the reference, held-out pair accuracy;
  :mod:`.plots`: the fronts; :mod:`.demo`: ``make demo-dpo``.

Submodules are imported lazily: importing this package does not import transformers.
"""
