"""``python -m pama_ext.tiny_world``: build or load the tiny world and print samples."""
import sys

from .build import main

sys.exit(main())
