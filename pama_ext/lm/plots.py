"""Plot helpers shared by the trainers' figures: matplotlib when it is there (optional: without it the
plots are skipped with a warning) and crash-safe PNG writes."""
from __future__ import annotations

import os
import tempfile
import warnings

from .files import tmp_prefix, umask

__all__ = ["pyplot", "save_figure"]


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a warning) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        return plt
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"plots skipped: matplotlib is not available ({e}); pip install matplotlib")
        return None


def save_figure(fig, path: str) -> str:
    """``fig`` as a PNG at ``path``, written to a temporary file and renamed into place; returns ``path``."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    # named like every temporary of the package, so a run killed mid-save leaves nothing that the next
    # run's remove_stale_temporaries does not clear (the format is given since the name has no .png)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(os.path.basename(path)), dir=d)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~umask())
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
