"""token_rewards: the kernel against pama_ext.reference (float64 and the low-precision tolerance rule,
DESIGN.md "Tests"), gradcheck, closed forms and the reference against the spec.

Opcheck and the bad-input cases shared by every op live in test_opcheck_compile.py and
test_bad_input.py (one parametrisation over all ops).
"""
from __future__ import annotations

import pytest
import torch

from pama_ext import ops, reference as ref
from op_runners import run_token_rewards
from pama_testutils import (GC, IMPLS, LOWP_DTYPES, NS, SHAPES, bad_input_batch, check_dtypes, compare_all,
                            make_inputs)

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# token_rewards
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta_kl", [0.0, 0.05])
@pytest.mark.parametrize("mask_kind", ["random", "holes"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", NS)
def test_token_rewards_f64(device, n, shape, mask_kind, beta_kl):
    x = make_inputs(n, *shape, seed=n * 7 + shape[1], mask=mask_kind)
    got = run_token_rewards(ops, x.to(device=device), beta_kl)
    want = run_token_rewards(ref, x, beta_kl)
    check_dtypes(got, F64, device, io_keys=["rewards", "grad_scores", "grad_old_logp", "grad_ref_logp"])
    compare_all(got, want)


@pytest.mark.parametrize("dtype", LOWP_DTYPES, ids=str)
@pytest.mark.parametrize("n", [2, 8])
def test_token_rewards_lowp(native, device, n, dtype):
    x = make_inputs(n, 5, 130, dtype=dtype, seed=3)
    got = run_token_rewards(ops, x.to(device=device), 0.05)
    check_dtypes(got, dtype, device, io_keys=["rewards", "grad_scores", "grad_old_logp", "grad_ref_logp"])
    compare_all(got, run_token_rewards(ref, x.as64(), 0.05), run_token_rewards(ref, x, 0.05), dtype)


# The CPU kernel works in tiles of 256 tokens per row and finds each row's last masked-in token once:
# T around a tile, rows whose last token is the row's last, in a later tile or absent.
@pytest.mark.parametrize("T", [1, 7, 255, 256, 257, 600])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_token_rewards_tiles_and_last_tokens(device, dtype, T):
    x = make_inputs(3, 5, T, dtype=dtype, seed=310 + T, mask="holes")  # row 2 is all masked out
    x.mask[0] = True                     # last token at T - 1
    x.mask[1] = False
    x.mask[1, : (T + 1) // 2] = True     # last token inside the row
    x.mask[3, -1] = False                # a hole at the end
    got = run_token_rewards(ops, x.to(device=device), 0.05)
    check_dtypes(got, dtype, device, io_keys=["rewards", "grad_scores", "grad_old_logp", "grad_ref_logp"])
    if dtype == F64:
        compare_all(got, run_token_rewards(ref, x, 0.05))
    else:
        compare_all(got, run_token_rewards(ref, x.as64(), 0.05), run_token_rewards(ref, x, 0.05), dtype)
    assert (got["rewards"][:, 2] == 0).all() and not got["rewards"][:, 2].signbit().any()


@pytest.mark.parametrize("beta_kl", [0.0, 0.3])
def test_gradcheck_token_rewards(beta_kl):
    x = make_inputs(2, 3, 9, seed=54, mask="random")

    def f(scores, old_logp, ref_logp):
        return ops.token_rewards(scores, old_logp, ref_logp, x.mask, beta_kl=beta_kl)

    args = tuple(t.clone().requires_grad_(True) for t in (x.scores, x.old_logp, x.ref_logp))
    assert torch.autograd.gradcheck(f, args, **GC)


@pytest.mark.parametrize("impl", ["ops", "reference"])
def test_token_rewards_place_score_on_last_valid_token(device, impl):
    mod = IMPLS[impl]
    x = make_inputs(3, 6, 17, seed=170, mask="holes")
    r = mod.token_rewards(*(t.to(device) for t in (x.scores, x.old_logp, x.ref_logp, x.mask))).cpu()
    for b in range(6):
        valid = x.mask[b].nonzero().flatten().tolist()
        if valid:
            want = torch.zeros(3, 17, dtype=F64)
            want[:, valid[-1]] = x.scores[:, b]
            assert torch.equal(r[:, b], want), b
        else:
            assert (r[:, b] == 0).all()
    # with the KL penalty, the masked-in positions carry -beta * (old - ref)
    beta = 0.3
    r = mod.token_rewards(*(t.to(device) for t in (x.scores, x.old_logp, x.ref_logp, x.mask)), beta_kl=beta).cpu()
    kl = -beta * (x.old_logp - x.ref_logp)
    for b in range(6):
        valid = x.mask[b].nonzero().flatten().tolist()
        for t in valid:
            want = kl[b, t] + (x.scores[:, b] if t == valid[-1] else 0.0)
            torch.testing.assert_close(r[:, b, t], want * torch.ones(3, dtype=F64), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("mask_kind", ["random", "holes"])
def test_token_rewards_reference_matches_spec(mask_kind, beta):
    x = make_inputs(3, 5, 19, seed=13, mask=mask_kind)
    r = ref.token_rewards(x.scores, x.old_logp, x.ref_logp, x.mask, beta_kl=beta)
    assert r.shape == (3, 5, 19)
    m = x.mask.tolist()
    for b in range(5):
        valid = [t for t in range(19) if m[b][t]]
        last = valid[-1] if valid else None
        for t in valid:  # algorithms §1 on the masked-in positions
            want = -beta * (x.old_logp[b, t] - x.ref_logp[b, t]) + (x.scores[:, b] if t == last else 0.0)
            torch.testing.assert_close(r[:, b, t], want * torch.ones(3, dtype=F64), rtol=1e-13, atol=1e-13)
        # the score is placed nowhere else
        others = [t for t in range(19) if t != last]
        if others and beta == 0.0:
            assert (r[:, b, others] == 0).all()


@pytest.mark.usefixtures("path")  # native and fallback (conftest.py)
def test_non_finite_padding_token_rewards(device):
    x = bad_input_batch(device)
    dirty = x.to()
    for name in ("old_logp", "ref_logp"):
        getattr(dirty, name)[~x.mask] = float("nan")
    a, b = run_token_rewards(ops, x, beta_kl=0.1), run_token_rewards(ops, dirty, beta_kl=0.1)
    m = x.mask.bool()
    torch.testing.assert_close(b["rewards"][:, m], a["rewards"][:, m], rtol=0, atol=0)
    assert torch.isfinite(b["rewards"]).all()
