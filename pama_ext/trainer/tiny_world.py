"""Deprecated alias of :mod:`pama_ext.tiny_world` (the tiny world moved out of the PPO trainer into its
own package). ``from pama_ext.trainer.tiny_world import build_tiny_world`` and
``python -m pama_ext.trainer.tiny_world`` keep working and give the same objects; use
:mod:`pama_ext.tiny_world` instead."""
import sys
import warnings

from .. import tiny_world

if __name__ == "__main__":
    sys.exit(tiny_world.main())
warnings.warn("pama_ext.trainer.tiny_world is deprecated; use pama_ext.tiny_world", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = tiny_world
