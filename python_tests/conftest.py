"""pytest configuration of the pama_ext suite.

- ``device`` fixture: "cpu" always, "cuda" when a GPU (and the CUDA kernels) are present. Without a
  GPU the CUDA cases are skipped, unless ``PAMA_EXT_REQUIRE_CUDA=1``, which turns the skip into a
  failure (run the whole suite that way on a machine with a GPU).
- The compiled library is required by default: without it, importing pama_ext fails and so does
  the suite (a plain ``pytest`` must never compare the reference with itself and pass). Set
  ``PAMA_EXT_REQUIRE_NATIVE=0`` to run the suite on the reference fallback on purpose; the tests
  that need the library then skip. The fallback path itself is tested explicitly: the ``path``
  fixture runs a test on the compiled ops and on the fallback (test_bad_input.py and the bad-input
  cases of the per-op files use it).
- ``inputs`` fixture: the seeded input factory of pama_testutils.
"""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_HERE, _ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

os.environ.setdefault("PAMA_EXT_REQUIRE_NATIVE", "1")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the fallback warning, under PAMA_EXT_REQUIRE_NATIVE=0
    import pama_ext  # noqa: E402,F401

from pama_testutils import make_inputs, require_native, resolve_device  # noqa: E402


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> str:
    return resolve_device(request.param)


@pytest.fixture
def native():
    require_native()
    return True


@pytest.fixture(params=["native", "fallback"])
def path(request, monkeypatch):
    """The compiled ops (skipped without them, failed under PAMA_EXT_REQUIRE_NATIVE=1), or the
    reference fallback with its Python argument checks (pama_ext.checks). Used by the bad-input
    tests (test_bad_input.py and the per-op files) so that both paths keep one contract."""
    from pama_ext import _native

    if request.param == "native":
        require_native()
    else:
        monkeypatch.setattr(_native, "NATIVE_AVAILABLE", False)
    return request.param


@pytest.fixture
def inputs():
    return make_inputs


@pytest.fixture(autouse=True)
def _restore_global_state():
    """Tests must not leak a changed default dtype or grad mode into each other."""
    dt = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dt)
    torch.set_grad_enabled(True)


# A small tiny world (2-layer model, briefly trained) shared by the trainer tests of this session.
@pytest.fixture(scope="session")
def world_cache(tmp_path_factory):
    """A small tiny world (500 reviews, a few pretraining steps, a smaller GPT-2) in a session cache."""
    # its users skip, not error, where the trainer stack is not installed (an installed wheel's op tests)
    pytest.importorskip("transformers")
    from pama_ext import tiny_world as tw

    cache = tmp_path_factory.mktemp("pama_cache")
    try:
        cfg = tw.TinyWorldConfig(n_layer=2, n_embd=64, n_head=2)
    except TypeError:  # pragma: no cover - the config grew or lost fields
        cfg = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tw.build_tiny_world(cache_dir=cache, n_reviews=500, train_steps=5, progress=False, config=cfg)
    return str(cache)
