"""fused_linear_dpo_loss and fused_linear_simpo_loss against their materialising float64 references,
against ops.dpo_loss / simpo_loss composed with plain logits, and against Liger-Kernel's fused linear
DPO/SimPO losses where liger-kernel is installed (the bench extra). Both paths: the one-pass
(gradients formed in the forward) and the recomputing one (fused_linear_logprobs)."""

import pytest
import torch
import torch.nn.functional as F

import rlp_engine.kernels.fused_linear_logprobs as K
import rlp_engine.ops.fused_preference as FP
from rlp_engine.ops import (
    DPO_LOSS_TYPES,
    dpo_loss,
    fused_linear_dpo_loss,
    fused_linear_simpo_loss,
    simpo_loss,
)

TOL = {torch.float64: 1e-10, torch.float32: 3e-5}
OPS = {
    "dpo": (fused_linear_dpo_loss, FP.fused_linear_dpo_loss_ref),
    "simpo": (fused_linear_simpo_loss, FP.fused_linear_simpo_loss_ref),
}


def make(b, tc, tr, h, v, dtype=torch.float64, bias=False, holes=True, ignore_index=-100, seed=0):
    """Fresh inputs (logits of O(1) spread); about a fifth of the labels are ignore_index, never a
    whole response."""
    g = torch.Generator().manual_seed(seed)
    hc = torch.randn(b, tc, h, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    hr = torch.randn(b, tr, h, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g, dtype=torch.float64) * (1.5 / h**0.5)).to(dtype).requires_grad_()
    bb = (torch.randn(v, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_() if bias else None
    labels = []
    for t in (tc, tr):
        y = torch.randint(0, v, (b, t), generator=g)
        if holes and t > 1:
            hole = torch.rand(b, t, generator=g) < 0.2
            hole[:, 0] = False  # keep one token per response
            y[hole] = ignore_index
        labels.append(y)
    refs = [torch.randn(b, generator=g, dtype=torch.float64) * 5 - 20 for _ in range(2)]
    return hc, hr, w, bb, labels[0], labels[1], refs


def run(fn, which, hc, hr, w, bb, yc, yr, refs, upstream=1.0, **kw):
    """(loss, chosen_rewards, rejected_rewards, grads of hc, hr, w[, bias]) of upstream * loss."""
    args = (hc, hr, w, yc, yr, *refs) if which == "dpo" else (hc, hr, w, yc, yr)
    loss, cr, rr = fn(*args, bias=bb, **kw)
    params = [hc, hr, w] + ([bb] if bb is not None else [])
    grads = torch.autograd.grad(loss * upstream, params)
    return loss, cr, rr, grads


def assert_close(got, want, tol):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if isinstance(a, (tuple, list)):
            assert_close(a, b, tol)
            continue
        assert a.dtype == b.dtype or tol > TOL[torch.float64], (i, a.dtype, b.dtype)
        assert a.shape == b.shape, (i, a.shape, b.shape)
        if a.numel() == 0:
            continue
        scale = max(1.0, b.double().abs().max().item())
        err = (a.double() - b.double()).abs().max().item()
        assert err <= tol * scale, (i, err, scale)


PATHS = {
    # name: (PAIR_SCRATCH_BYTES["cpu"], K.CPU_SCRATCH_BYTES, grad_fn name)
    "one_pass_all_pairs": (256 << 20, 32 << 20, "_OnePassFnBackward"),
    "one_pass_pair_by_pair": (256 << 20, 1, "_OnePassFnBackward"),
    "recompute": (0, 16 << 10, "MeanBackward0"),
}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    pair, scratch, node = PATHS[request.param]
    monkeypatch.setitem(FP.PAIR_SCRATCH_BYTES, "cpu", pair)
    monkeypatch.setattr(K, "CPU_SCRATCH_BYTES", scratch)
    return node


@pytest.mark.parametrize("which", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "shape,bias", [((3, 5, 7, 6, 11), True), ((1, 9, 9, 13, 37), False), ((4, 1, 6, 8, 5), True)]
)
def test_matches_float64_reference(path, which, dtype, shape, bias):
    fn, ref = OPS[which]
    hc, hr, w, bb, yc, yr, refs = make(*shape, dtype=dtype, bias=bias, seed=sum(shape))
    got = run(fn, which, hc, hr, w, bb, yc, yr, refs, upstream=1.7)
    assert type(got[0].grad_fn).__name__ == path  # the path under test really ran
    wide = [t.detach().double().requires_grad_() if t is not None else None for t in (hc, hr, w, bb)]
    want = run(ref, which, *wide, yc, yr, refs, upstream=1.7)
    assert got[0].shape == () and got[1].shape == got[2].shape == (shape[0],)
    assert_close(got, want, TOL[dtype])


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_loss_types_and_smoothing(path, loss_type):
    hc, hr, w, bb, yc, yr, refs = make(3, 6, 4, 7, 19, bias=True, seed=3)
    smooth = 0.2 if loss_type in ("sigmoid", "robust") else 0.0
    kw = dict(beta=0.3, loss_type=loss_type, label_smoothing=smooth)
    got = run(fused_linear_dpo_loss, "dpo", hc, hr, w, bb, yc, yr, refs, **kw)
    want = run(FP.fused_linear_dpo_loss_ref, "dpo", hc, hr, w, bb, yc, yr, refs, **kw)
    assert_close(got, want, TOL[torch.float64])


def test_simpo_settings(path):
    hc, hr, w, bb, yc, yr, refs = make(2, 7, 3, 5, 23, seed=4)
    kw = dict(beta=1.3, gamma_beta_ratio=-0.4, label_smoothing=0.1)
    got = run(fused_linear_simpo_loss, "simpo", hc, hr, w, bb, yc, yr, refs, **kw)
    want = run(FP.fused_linear_simpo_loss_ref, "simpo", hc, hr, w, bb, yc, yr, refs, **kw)
    assert_close(got, want, TOL[torch.float64])


def _token_logps_plain(h, w, b, y, ignore_index):
    """Token log-probs from materialised logits through cross_entropy (a formula independent of the
    references' log_softmax + gather); 0 on ignored tokens."""
    logits = F.linear(h, w, b)  # (B, T, V)
    return -F.cross_entropy(logits.transpose(1, 2), y, ignore_index=ignore_index, reduction="none")


@pytest.mark.parametrize("which", list(OPS))
def test_matches_ops_losses_on_materialised_logits(path, which):
    ig = -1
    hc, hr, w, bb, yc, yr, (rc, rr) = make(3, 8, 5, 9, 29, bias=True, ignore_index=ig, seed=5)
    tc, tr = (_token_logps_plain(h, w, bb, y, ig) for h, y in ((hc, yc), (hr, yr)))
    if which == "dpo":
        losses, cr, rj = dpo_loss(tc.sum(1), tr.sum(1), rc, rr, beta=0.2)
        loss, c, r = fused_linear_dpo_loss(hc, hr, w, yc, yr, rc, rr, beta=0.2, ignore_index=ig, bias=bb)
    else:
        nc, nr = (yc != ig).sum(1), (yr != ig).sum(1)
        losses, cr, rj = simpo_loss(tc.sum(1) / nc, tr.sum(1) / nr, beta=2.5, gamma_beta_ratio=0.3)
        loss, c, r = fused_linear_simpo_loss(
            hc, hr, w, yc, yr, beta=2.5, gamma_beta_ratio=0.3, ignore_index=ig, bias=bb
        )
    params = (hc, hr, w, bb)
    want = (losses.mean(), cr, rj, torch.autograd.grad(losses.mean(), params))
    assert_close((loss, c, r, torch.autograd.grad(loss, params)), want, TOL[torch.float64])


def test_dpo_response_with_every_label_ignored_has_logprob_zero(path):
    hc, hr, w, bb, yc, yr, (rc, rr) = make(3, 5, 6, 7, 13, seed=6)
    yc[1] = -100  # an empty chosen response: log-prob 0, no gradient into its hidden states
    loss, cr, rj, (ghc, ghr, gw) = run(fused_linear_dpo_loss, "dpo", hc, hr, w, None, yc, yr, (rc, rr))
    assert cr[1].item() == pytest.approx(0.1 * (0.0 - rc[1].item()), abs=1e-12)
    assert torch.equal(ghc[1], torch.zeros_like(ghc[1])) and ghr[1].abs().sum() > 0
    want = run(FP.fused_linear_dpo_loss_ref, "dpo", hc, hr, w, None, yc, yr, (rc, rr))
    assert_close((loss, cr, rj, (ghc, ghr, gw)), want, TOL[torch.float64])


@pytest.mark.parametrize("side", ["chosen", "rejected"])
def test_simpo_response_with_every_label_ignored_is_refused(side):
    hc, hr, w, _, yc, yr, _ = make(4, 5, 6, 7, 13, seed=7)
    (yc if side == "chosen" else yr)[2] = -100
    with pytest.raises(ValueError, match=rf"fused_linear_simpo_loss: labels_{side} row 2 .*undefined"):
        fused_linear_simpo_loss(hc, hr, w, yc, yr)
    ref = FP.fused_linear_simpo_loss_ref(hc, hr, w, yc, yr)[0]
    assert torch.isnan(ref)  # what a materialising mean (TRL, Liger) gives instead


@pytest.mark.parametrize("which", list(OPS))
def test_no_grad_and_partial_grad(which):
    hc, hr, w, bb, yc, yr, refs = make(2, 4, 5, 6, 17, bias=True, seed=8)
    fn, _ = OPS[which]
    args = (hc, hr, w, yc, yr, *refs) if which == "dpo" else (hc, hr, w, yc, yr)
    full = fn(*args, bias=bb)
    with torch.no_grad():
        plain = fn(*args, bias=bb)
    assert plain[0].grad_fn is None
    assert_close(plain, [t.detach() for t in full], TOL[torch.float64])
    # only weight trainable (frozen trunk): the one-pass path still gives its gradient
    frozen = [t.detach() for t in (hc, hr)]
    args2 = (*frozen, w, *args[3:])
    (gw,) = torch.autograd.grad(fn(*args2, bias=bb.detach())[0], (w,))
    (want,) = torch.autograd.grad(full[0], (w,), retain_graph=True)
    assert_close([gw], [want], TOL[torch.float64])
    # frozen LM head and bias (LoRA-style): hidden gradients only (the weight GEMM is skipped)
    args3 = (hc, hr, w.detach(), *args[3:])
    loss = fn(*args3, bias=bb.detach())[0]
    assert type(loss.grad_fn).__name__ == "_OnePassFnBackward"
    got = torch.autograd.grad(loss, (hc, hr))
    assert_close(got, torch.autograd.grad(full[0], (hc, hr)), TOL[torch.float64])


def _plain_bf16_dpo(hc, hr, w, yc, yr, rc, rr, bias):
    """What plain PyTorch does in bf16: bf16 logits, fp32 log_softmax, ops.dpo_loss."""

    def logps(h, y):
        logp = F.linear(h, w, bias).float().log_softmax(-1)
        keep = y != -100
        return (logp.gather(-1, torch.where(keep, y, 0).unsqueeze(-1)).squeeze(-1) * keep).sum(-1)

    losses, c, r = dpo_loss(logps(hc, yc), logps(hr, yr), rc, rr)
    return losses.mean(), c, r


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def test_bf16_error_at_most_twice_plain_torch_bf16():
    hc, hr, w, bb, yc, yr, refs = make(2, 16, 12, 32, 64, dtype=torch.bfloat16, bias=True, seed=9)
    refs = [r.float() for r in refs]
    got = run(fused_linear_dpo_loss, "dpo", hc, hr, w, bb, yc, yr, refs)
    plain = run(_plain_bf16_dpo, "dpo", hc, hr, w, bb, yc, yr, refs)
    wide = [t.detach().double().requires_grad_() for t in (hc, hr, w, bb)]
    want = run(FP.fused_linear_dpo_loss_ref, "dpo", *wide, yc, yr, refs)
    assert got[0].dtype == torch.float32 and got[3][0].dtype == torch.bfloat16
    for a, p, b in zip([*got[:3], *got[3]], [*plain[:3], *plain[3]], [*want[:3], *want[3]], strict=True):
        assert _err(a, b) <= 2 * _err(p, b) + 1e-6, (_err(a, b), _err(p, b))


def test_bad_input_names_the_argument():
    hc, hr, w, bb, yc, yr, (rc, rr) = make(2, 4, 5, 6, 17, bias=True, seed=10)
    op = "fused_linear_dpo_loss"

    def call(**over):
        a = dict(hidden_chosen=hc, hidden_rejected=hr, weight=w, labels_chosen=yc, labels_rejected=yr)
        a.update(ref_chosen_logps=rc, ref_rejected_logps=rr)
        a.update(over)
        return fused_linear_dpo_loss(**a)

    cases = [
        (dict(hidden_rejected=hr[:1], labels_rejected=yr[:1]), ValueError, "hidden_rejected has 1 rows"),
        (dict(hidden_chosen=hc[0]), ValueError, "hidden_chosen must have 3 dims"),
        (dict(labels_chosen=yc.float()), TypeError, "labels_chosen must be an int64"),
        (dict(labels_rejected=yr[:, :2]), ValueError, "labels_rejected must have shape"),
        (dict(weight=w.float()), ValueError, "hidden_chosen must be .* dtype"),
        (
            dict(labels_rejected=yr.index_put((torch.tensor(1), torch.tensor(2)), torch.tensor(17))),
            ValueError,
            "labels_rejected: 17 is outside",
        ),
        (
            dict(labels_chosen=yc.index_put((torch.tensor(0), torch.tensor(3)), torch.tensor(-5))),
            ValueError,
            "labels_chosen: -5 is outside",
        ),
        (dict(ref_chosen_logps=rc[:1]), ValueError, "ref_chosen_logps must be \\[B\\] = \\[2\\]"),
        (dict(beta=0.0), ValueError, "beta must be"),
        (dict(loss_type="kto"), ValueError, "loss_type"),
        (dict(loss_type="ipo", label_smoothing=0.1), ValueError, "label_smoothing must be 0"),
        (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
        (dict(bias=bb[:3]), ValueError, "bias must be"),
        (
            dict(hidden_chosen=hc[:0], hidden_rejected=hr[:0], labels_chosen=yc[:0], labels_rejected=yr[:0]),
            ValueError,
            "no pairs",
        ),
    ]
    for over, err, msg in cases:
        with pytest.raises(err, match=f"{op}: .*{msg}"):
            call(**over)
    with pytest.raises(ValueError, match="fused_linear_simpo_loss: gamma_beta_ratio must be a finite"):
        fused_linear_simpo_loss(hc, hr, w, yc, yr, gamma_beta_ratio=float("nan"))


@pytest.mark.parametrize("which", list(OPS))
def test_matches_liger_kernel(which):
    chunked = pytest.importorskip("liger_kernel.chunked_loss")  # the bench extra
    hc, hr, w, bb, yc, yr, _ = make(3, 6, 6, 8, 31, dtype=torch.float32, bias=True, seed=11)
    zeros = [torch.zeros(3), torch.zeros(3)]  # Liger's DPO without a reference model: ref logps 0
    x = torch.cat([hc, hr]).detach().requires_grad_()  # Liger's layout: [chosen; rejected]
    wl, bl = w.detach().requires_grad_(), bb.detach().requires_grad_()
    if which == "dpo":
        mod = chunked.LigerFusedLinearDPOLoss(beta=0.2, use_ref_model=False, compiled=False)
        ours = fused_linear_dpo_loss(hc, hr, w, yc, yr, *zeros, beta=0.2, bias=bb)
    else:  # Liger's gamma is the margin itself: gamma_beta_ratio * beta
        mod = chunked.LigerFusedLinearSimPOLoss(beta=2.0, gamma=1.0, compute_nll_loss=False, compiled=False)
        ours = fused_linear_simpo_loss(hc, hr, w, yc, yr, beta=2.0, gamma_beta_ratio=0.5, bias=bb)
    theirs, aux = mod(wl, x, torch.cat([yc, yr]), bl)
    cr, rr = aux[5:7]  # after chosen/rejected logps, their logits means and the NLL loss
    g_ours = torch.autograd.grad(ours[0], (hc, hr, w, bb))
    g_theirs = torch.autograd.grad(theirs, (x, wl, bl))
    assert_close([ours[0], ours[1], ours[2]], [theirs, cr, rr], TOL[torch.float32])
    assert_close([torch.cat(g_ours[:2]), *g_ours[2:]], list(g_theirs), TOL[torch.float32])


@pytest.mark.parametrize("which", list(OPS))
def test_one_pass_chunks_of_two_pairs_and_a_partial_last_one(monkeypatch, which):
    b, tc, tr, v = 5, 4, 6, 16
    monkeypatch.setattr(K, "CPU_SCRATCH_BYTES", 2 * (tc + tr) * v * 8)  # 2 pairs of fp64 logits
    hc, hr, w, bb, yc, yr, refs = make(b, tc, tr, 7, v, bias=True, seed=12)
    fn, ref = OPS[which]
    got = run(fn, which, hc, hr, w, bb, yc, yr, refs, upstream=-0.6)
    assert type(got[0].grad_fn).__name__ == "_OnePassFnBackward"
    want = run(ref, which, hc, hr, w, bb, yc, yr, refs, upstream=-0.6)
    assert_close(got, want, TOL[torch.float64])


def test_empty_chosen_responses(path):
    # T_chosen = 0: DPO's chosen log-probs are 0 (empty sums); SimPO's means are undefined
    hc, hr, w, bb, yc, yr, refs = make(2, 0, 5, 4, 9, bias=True, seed=13)
    got = run(fused_linear_dpo_loss, "dpo", hc, hr, w, bb, yc, yr, refs)
    want = run(FP.fused_linear_dpo_loss_ref, "dpo", hc, hr, w, bb, yc, yr, refs)
    assert_close(got, want, TOL[torch.float64])
    assert got[3][0].shape == (2, 0, 4) and got[3][1].abs().sum() > 0
    with pytest.raises(ValueError, match="labels_chosen row 0 has no label other than ignore_index"):
        fused_linear_simpo_loss(hc, hr, w, yc, yr)
