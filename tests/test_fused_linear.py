"""fused_linear_logprobs and fused_linear_ppo_loss against materialising float64 references, on the
chunked-torch path and the Triton kernels (interpreter on CPU, small shapes)."""

import pytest
import torch
import torch.nn.functional as F

import rlp_engine.kernels.fused_linear_logprobs as K
from rlp_engine.kernels.fused_linear_logprobs import fused_linear_logprobs_ref
from rlp_engine.ops import (
    AGG_MODES,
    KL_KINDS,
    agg_loss,
    backend,
    fused_linear_logprobs,
    fused_linear_ppo_loss,
    kl_penalty,
    masked_mean,
    ppo_policy_loss,
)

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
# fp32 inputs on GPU take tf32 dot operands (K.FP32_PRECISION): the tensor core truncates each operand
# to 10 mantissa bits (relative error < 2^-10), so logits, log-probs, entropies and the gradients
# (dz from tf32 logits) err by ~1e-3 of their scale (measured 3e-4 to 1.1e-3 in the interpreter's
# emulation at H=48 and 256); 4e-3 leaves 4x.
TOL_TF32 = 4e-3


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    # A 16 KiB scratch budget forces several row blocks and vocab chunks (and partial last ones).
    monkeypatch.setattr(K, "CPU_SCRATCH_BYTES", 16 << 10)


def make(n, h, v, dtype=torch.float32, bias=False, ignore=True, lead=None):
    """Fresh inputs with logits of O(1) spread; a few rows carry ignore_index."""
    hidden = torch.randn(*(lead or (n,)), h, dtype=dtype)
    weight = (torch.randn(v, h, dtype=torch.float64) * (1.5 / h**0.5)).to(dtype)
    b = (torch.randn(v, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, hidden.shape[:-1])
    if ignore and labels.numel() > 2:
        labels.view(-1)[torch.randperm(labels.numel())[: labels.numel() // 5]] = -100
    return hidden, weight, b, labels


def grads_of(fn, hidden, weight, bias, labels, temperature, g_lp, g_ent, dtype=None):
    """Values and (hidden, weight, bias) gradients of sum(g_lp lp + g_ent ent)."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (hidden, weight) if t is not None]
    if bias is not None:
        leaves.append(bias.detach().to(dtype or bias.dtype).requires_grad_())
    b = leaves[2] if bias is not None else None
    lp, ent = fn(leaves[0], leaves[1], labels, temperature=temperature, bias=b, return_entropy=True)
    objective = (lp.double() * g_lp).sum() + (ent.double() * g_ent).sum()
    return (lp.detach(), ent.detach(), *torch.autograd.grad(objective, leaves))


def assert_close(got, want, tol, what):
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, want.double().abs().max().item() if want.numel() else 0.0)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} x {scale:.3g}"


def check_against_ref(name, hidden, weight, bias, labels, temperature, tol):
    g_lp = torch.randn(labels.shape, dtype=torch.float64)
    g_ent = torch.randn(labels.shape, dtype=torch.float64)
    with backend(name):
        got = grads_of(fused_linear_logprobs, hidden, weight, bias, labels, temperature, g_lp, g_ent)
    want = grads_of(
        fused_linear_logprobs_ref, hidden, weight, bias, labels, temperature, g_lp, g_ent, torch.float64
    )
    for g, w, what in zip(got, want, ("logprob", "entropy", "grad_hidden", "grad_weight", "grad_bias")):
        assert g.shape == w.shape, what
        assert_close(g, w, tol, f"{name} {what}")
    ignored = labels == -100
    assert (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all()
    assert (got[2][ignored] == 0).all(), "an ignored row received gradient"
    return got


@pytest.mark.parametrize("vocab", [1, 1000, 5003])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_matches_reference(vocab, bias, dtype):
    hidden, weight, b, labels = make(37, 24, vocab, dtype, bias)
    check_against_ref("torch", hidden, weight, b, labels, 0.7 if bias else 1.0, TOL[dtype])


def test_chunked_large_vocab_and_3d():
    # A Qwen-sized vocabulary (151936: one row per chunk at this budget) and [B, T, H] input.
    hidden, weight, b, labels = make(0, 8, 151936, bias=True, lead=(2, 3))
    check_against_ref("torch", hidden, weight, b, labels, 1.3, TOL[torch.float32])


@pytest.mark.parametrize(
    "n,h,vocab,bias,temperature",
    [(37, 48, 1000, True, 0.7), (37, 16, 5003, False, 1.0), (5, 16, 1, True, 2.0)],
)
def test_triton_interpreter_matches_reference(n, h, vocab, bias, temperature):
    hidden, weight, b, labels = make(n, h, vocab, torch.float32, bias)
    check_against_ref("triton", hidden, weight, b, labels, temperature, TOL[torch.float32])


@pytest.mark.parametrize(
    "n,h,vocab,bias,temperature", [(37, 48, 1000, True, 0.7), (37, 256, 3000, False, 1.0)]
)
def test_triton_interpreter_tf32_within_documented_tolerance(n, h, vocab, bias, temperature, monkeypatch):
    # The GPU's fp32 contract (tf32 operands, fp32 accumulation), emulated by the kernels under the
    # interpreter: within TOL_TF32 of float64, and measurably off IEEE fp32 (the emulation is live).
    monkeypatch.setattr(K, "INTERPRET_PRECISION", "tf32")
    hidden, weight, b, labels = make(n, h, vocab, torch.float32, bias)
    got = check_against_ref("triton", hidden, weight, b, labels, temperature, TOL_TF32)
    exact = fused_linear_logprobs_ref(hidden.double(), weight.double(), labels, temperature, b)
    assert (got[0].double() - exact).abs().max() > TOL[torch.float32], "tf32 emulation had no effect"


@pytest.mark.parametrize("n,vocab,slices", [(37, 1000, 5), (300, 64, 16), (1, 7, 1), (0, 10, 2)])
def test_combine_partials_kernel(n, vocab, slices):
    # The forward's per-slice partials (max, sum exp, sum exp*z, z[y]) of fresh logits, combined by the
    # Triton kernel (interpreter), against log_softmax in float64; ignored rows give 0.
    from rlp_engine.kernels.fused_linear_combine import combine_partials

    z = torch.randn(n, vocab, dtype=torch.float64) * 3
    labels = torch.randint(0, vocab, (n,))
    labels[::4] = -100
    part = torch.zeros(4, slices, n, dtype=torch.float64)
    for i, cols in enumerate(torch.arange(vocab).tensor_split(slices)):
        zc = z[:, cols]
        m = zc.amax(dim=1)
        e = torch.exp(zc - m[:, None])
        hit = (labels[:, None] == cols[None, :]).double()
        part[:, i] = torch.stack([m, e.sum(1), (e * zc).sum(1), (hit * zc).sum(1)])
    lp, ent, lse = combine_partials(part.float().contiguous(), labels, -100, True)
    logp = z.log_softmax(-1)
    keep = labels != -100
    want_lp = torch.where(keep, logp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1), 0.0)
    want_ent = torch.where(keep, -(logp.exp() * logp).sum(-1), 0.0)
    for got, want, what in ((lse, z.logsumexp(-1), "lse"), (lp, want_lp, "logprob"), (ent, want_ent, "ent")):
        assert got.dtype == torch.float32 and got.shape == (n,)
        assert_close(got, want, 1e-5, what)
    lp2, ent2, _ = combine_partials(part.float().contiguous(), labels, -100, False)
    assert ent2 is None and torch.equal(lp2, lp)


def test_gpu_tiles_per_arch():
    # Hopper and newer: 128x128 tiles, 3 stages; Ampere (sm_80/86/89) and older: 128x64, 4 stages
    # (spill-free there, bench/triton_aot.py). fp32 takes tf32 dots with a narrower K step.
    for arch, block_v, stages in [(90, 128, 3), (100, 128, 3), (80, 64, 4), (86, 64, 4), (75, 64, 4)]:
        for dtype, block_h in [(torch.bfloat16, 64), (torch.float16, 64), (torch.float32, 32)]:
            cfg = K._config(dtype, arch)
            got = (cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_H"], cfg["num_stages"], cfg["UPCAST"])
            assert got == (128, block_v, block_h, stages, False), (arch, dtype, cfg)
            assert cfg["PRECISION"] == ("tf32" if dtype != torch.float32 else K.FP32_PRECISION)
    assert K.FP32_PRECISION == "tf32"
    cpu = K._config(torch.float32, None)
    assert cpu["UPCAST"] and cpu["PRECISION"] == "ieee" and "num_stages" not in cpu


def test_vocab_splits_from_sm_count():
    # n_tiles = 1024 (V = 131072 at BLOCK_V = 128), BLOCK_N = 128.
    assert K._splits(1024, 16384, 128, 132) == 16  # 128 row blocks: 16 slices already fill the SMs
    for n, sms in [(512, 132), (1000, 132), (512, 108), (128, 148), (1, 132)]:
        s = K._splits(1024, n, 128, sms)
        assert s > 16 and -(-n // 128) * s >= 2 * sms, (n, sms, s)  # two waves of programs
        assert -(-n // 128) * (s - 1) < 2 * sms, (n, sms, s)  # and no more slices than that takes
    assert K._splits(10, 512, 128, 132) == 10  # never more slices than vocab tiles
    assert K._splits(1024, 1 << 22, 128, 132) == 4  # [4, S, N] fp32 partials <= 256 MB
    assert 4 * 4 * K._splits(1024, 3 << 20, 128, 132) * (3 << 20) <= 1 << 28
    assert K._splits(1024, 512, 128, None) == 3  # CPU / interpreter: unchanged
    assert K._splits(2, 512, 128, None) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda_matches_reference(dtype, monkeypatch):
    # Real GPU tile configs (128 x 128 tiles, 16 vocab slices) and 4 backward chunks of 256 rows.
    monkeypatch.setattr(K, "GPU_SCRATCH_BYTES", 256 * 50257 * 4)
    hidden, weight, b, labels = make(1000, 256, 50257, dtype, True)
    hidden, weight, b, labels = (t.cuda() for t in (hidden, weight, b, labels))
    g_lp, g_ent = torch.randn(1000, dtype=torch.float64).cuda(), torch.randn(1000, dtype=torch.float64).cuda()
    with backend("triton"):
        got = grads_of(fused_linear_logprobs, hidden, weight, b, labels, 0.8, g_lp, g_ent)
    want = grads_of(fused_linear_logprobs_ref, hidden, weight, b, labels, 0.8, g_lp, g_ent, torch.float64)
    tol = TOL_TF32 if dtype == torch.float32 else 3e-2  # fp32: tf32 operands (K.FP32_PRECISION)
    for g, w, what in zip(got, want, ("logprob", "entropy", "grad_hidden", "grad_weight", "grad_bias")):
        assert_close(g, w, tol, f"cuda {dtype} {what}")


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_bf16_error_at_most_twice_plain_torch(name):
    hidden, weight, b, labels = make(40, 64, 700, torch.bfloat16, True)
    g_lp, g_ent = torch.randn(40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    with backend(name):
        got = grads_of(fused_linear_logprobs, hidden, weight, b, labels, 1.0, g_lp, g_ent)
    want = grads_of(fused_linear_logprobs_ref, hidden, weight, b, labels, 1.0, g_lp, g_ent, torch.float64)

    def plain(h, w, y, temperature, bias, return_entropy):  # what users write: bf16 linear, fp32 softmax
        logp = F.linear(h, w, bias).float().div(temperature).log_softmax(-1)
        ign = y == -100
        lp = torch.where(ign, 0.0, logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1))
        return lp, torch.where(ign, 0.0, -(logp.exp() * logp).sum(-1))

    base = grads_of(plain, hidden, weight, b, labels, 1.0, g_lp, g_ent)
    for g, p, w, what in zip(
        got, base, want, ("logprob", "entropy", "grad_hidden", "grad_weight", "grad_bias")
    ):
        err = (g.double() - w).abs().max().item()
        ref_err = (p.double() - w).abs().max().item()
        assert err <= 2 * ref_err + 1e-6, f"{name} bf16 {what}: error {err:.3g} vs plain torch {ref_err:.3g}"


# No "cpp" case in the tests below: backend("cpp") runs the very chunked-torch code of "torch" here
# (there is no C++ fused-linear kernel: its work is oneDNN/MKL GEMMs already); that the alias holds
# is test_cpp_is_the_torch_path's one check.
@pytest.mark.parametrize("name", ["torch", "triton"])
def test_ignored_rows_and_upstream_nan(name):
    hidden, weight, _, labels = make(9, 16, 300, ignore=False)
    labels[[0, 4]] = -100
    h = hidden.clone().requires_grad_()
    with backend(name):
        lp, ent = fused_linear_logprobs(h, weight, labels, return_entropy=True)
    g = torch.randn(9)
    g[[0, 4]] = float("nan")  # whatever flows into an ignored row must not come back out
    torch.autograd.backward((lp, ent), (g, g))
    assert torch.isfinite(h.grad).all() and (h.grad[[0, 4]] == 0).all()
    assert (lp[[0, 4]] == 0).all() and (ent[[0, 4]] == 0).all()
    assert (lp[1:4] < 0).all() and (ent[1:4] > 0).all()


def test_cpp_is_the_torch_path():
    """backend("cpp") is accepted by the fused-linear ops and runs the chunked torch path: bit-identical
    log-probs, entropy, PPO loss and gradients to backend("torch")."""
    hidden, weight, b, labels = make(13, 16, 300, bias=True)
    g = torch.randn(13, dtype=torch.float64)
    old, adv = torch.randn(13), torch.randn(13)
    mask = labels != -100
    runs = []
    for name in ("torch", "cpp"):
        with backend(name):
            got = grads_of(fused_linear_logprobs, hidden, weight, b, labels, 0.8, g, g)
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            loss, _ = fused_linear_ppo_loss(h, w, labels.clamp(min=0), old, adv, mask, bias=b)
        runs.append((*got, loss, *torch.autograd.grad(loss, (h, w))))
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_empty_and_forward_only_entropy_grad():
    hidden, weight, _, _ = make(0, 8, 50, lead=(2, 0))
    out = fused_linear_logprobs(hidden, weight, torch.zeros(2, 0, dtype=torch.long))
    assert out.shape == (2, 0)
    hidden, weight, _, labels = make(6, 8, 50)
    h = hidden.clone().requires_grad_()
    lp = fused_linear_logprobs(h, weight, labels)  # logprob only: entropy terms never enter the backward
    lp.sum().backward()
    ref = hidden.clone().double().requires_grad_()
    fused_linear_logprobs_ref(ref, weight.double(), labels).sum().backward()
    assert_close(h.grad, ref.grad, TOL[torch.float32], "grad_hidden")


def test_bad_inputs_name_the_argument():
    hidden, weight, b, labels = make(4, 8, 10, bias=True)
    f = fused_linear_logprobs
    with pytest.raises(ValueError, match="weight"):
        f(hidden, weight[:, :5], labels)
    with pytest.raises(TypeError, match="weight"):
        f(hidden, weight.double(), labels)
    with pytest.raises(TypeError, match="labels"):
        f(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="labels"):
        f(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="bias"):
        f(hidden, weight, labels, bias=b[:4])
    with pytest.raises(ValueError, match="hidden"):
        f(hidden[0], weight, labels[0])
    with pytest.raises(TypeError, match="hidden"):
        f(hidden.long(), weight, labels)
    with pytest.raises(ValueError, match="temperature"):
        f(hidden, weight, labels, temperature=0.0)
    with pytest.raises(TypeError, match="float64"), backend("triton"):
        f(hidden.double(), weight.double(), labels)


# ----------------------------------------------------------------------------------------------
# PPO loss: an independent float64 composition written from DESIGN's formulas (torch autograd)
# ----------------------------------------------------------------------------------------------


def kl_ref(r, kind):
    base = kind.rstrip("+")
    if base in ("k1", "kl"):
        val = r
    elif base == "abs":
        val = r.abs()
    elif base in ("k2", "mse"):
        val = r * r / 2
    elif base == "k1_nonneg":
        val = r.clamp(min=0)
    else:
        k = (-r).clamp(-20, 20)
        val = (k.exp() - k - 1).clamp(-10, 10)
    if kind.endswith("+"):
        k2 = r * r / 2
        val = k2 - k2.detach() + val.detach()
    return val


def ppo_ref(lp, ent, old, adv, ref, mask, cfg):
    """DESIGN's PPO + KL + entropy loss composed from per-token pieces, with agg_loss; and metrics."""
    m = mask.bool()
    old, adv = torch.where(m, old, lp.detach()), torch.where(m, adv, 0.0)
    nk = (lp - old).clamp(-20, 20)
    rho = nk.exp()
    pg1, pg2 = -adv * rho, -adv * rho.clamp(1 - cfg["clip_low"], 1 + cfg["clip_high"])
    c1 = torch.maximum(pg1, pg2)
    loss_tok, lower = c1, torch.zeros_like(c1, dtype=torch.bool)
    if cfg["dual_clip"] is not None:
        pg3 = -adv * cfg["dual_clip"]
        loss_tok = torch.where(adv < 0, torch.minimum(pg3, c1), c1)
        lower = (c1 > pg3) & (adv < 0)
    kl = kl_ref(lp - torch.where(m, ref, lp.detach()), cfg["kl_kind"])
    agg = cfg["agg"]
    loss = agg_loss(loss_tok, mask, agg) + cfg["kl_coef"] * agg_loss(kl, mask, agg)
    loss = loss - cfg["entropy_coef"] * agg_loss(ent, mask, agg)
    metrics = {
        "clipfrac": masked_mean((pg2 > pg1).double(), mask),
        "approx_kl": masked_mean(-nk, mask),
        "clipfrac_lower": masked_mean(lower.double(), mask),
        "kl": masked_mean(kl, mask),
        "entropy": masked_mean(ent, mask),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


def ppo_case(b=3, t=11, h=16, v=257, bias=True):
    hidden, weight, bias_t, labels = make(0, h, v, bias=bias, ignore=False, lead=(b, t))
    mask = torch.rand(b, t) < 0.8
    mask[0, 0] = True
    mask[-1] = False  # an empty row
    with torch.no_grad():
        lp = fused_linear_logprobs_ref(hidden, weight, labels, bias=bias_t)
    old = lp + 0.3 * torch.randn(b, t)  # ratios on both sides of the clip range
    ref = lp + 0.5 * torch.randn(b, t)
    adv = torch.randn(b, t)
    for x in (old, ref, adv):
        x[~mask] = float("nan")  # must not leak
    return hidden, weight, bias_t, labels, old, adv, ref, mask


def run_both(name, case, cfg, temperature=0.9):
    hidden, weight, bias, labels, old, adv, ref, mask = case
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()]
    with backend(name):
        loss, metrics = fused_linear_ppo_loss(
            *leaves[:2],
            labels,
            old,
            adv,
            mask,
            ref_logprob=ref,
            temperature=temperature,
            bias=leaves[2],
            **cfg,
        )
    grads = torch.autograd.grad(loss, leaves)
    rleaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    lp, ent = fused_linear_logprobs_ref(rleaves[0], rleaves[1], labels, temperature, rleaves[2], True)
    rloss, rmetrics = ppo_ref(lp, ent, old.double(), adv.double(), ref.double(), mask, cfg)
    rgrads = torch.autograd.grad(rloss, rleaves)
    return (loss, metrics, grads), (rloss, rmetrics, rgrads)


def assert_ppo_close(got, want, tol):
    (loss, metrics, grads), (rloss, rmetrics, rgrads) = got, want
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert_close(loss, rloss, tol, "loss")
    for what, g, r in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, rgrads):
        assert torch.isfinite(g).all(), what
        assert_close(g, r, tol, what)
    assert set(metrics) == set(rmetrics)
    for k in rmetrics:
        assert metrics[k].dim() == 0
        assert_close(metrics[k], rmetrics[k], tol, k)


BASE = dict(
    clip_low=0.2,
    clip_high=0.28,
    dual_clip=None,
    kl_coef=0.0,
    kl_kind="k3",
    entropy_coef=0.0,
    agg="token-mean",
)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_ppo_loss_agg_modes(agg):
    cfg = {**BASE, "agg": agg, "kl_coef": 0.1, "entropy_coef": 0.01, "dual_clip": 3.0}
    assert_ppo_close(*run_both("torch", ppo_case(), cfg), 1e-5)


@pytest.mark.parametrize("kind", ["k1", "abs", "k2", "k3", "low_var_kl", "k1_nonneg", "k3+", "abs+"])
def test_ppo_loss_kl_kinds(kind):
    cfg = {**BASE, "kl_kind": kind, "kl_coef": 0.2}
    assert_ppo_close(*run_both("torch", ppo_case(), cfg), 1e-5)


@pytest.mark.parametrize("dual_clip,entropy_coef", [(None, 0.0), (2.5, 0.0), (None, 0.05)])
def test_ppo_loss_dual_clip_and_entropy(dual_clip, entropy_coef):
    cfg = {**BASE, "dual_clip": dual_clip, "entropy_coef": entropy_coef, "agg": "seq-mean-token-mean"}
    assert_ppo_close(*run_both("torch", ppo_case(), cfg), 1e-5)


def test_ppo_loss_triton_interpreter():
    cfg = {**BASE, "dual_clip": 3.0, "kl_coef": 0.1, "kl_kind": "k2", "entropy_coef": 0.02}
    assert_ppo_close(*run_both("triton", ppo_case(b=2, t=9, h=16, v=300), cfg), 1e-5)


def test_ppo_loss_no_grad_and_2d_hidden():
    hidden, weight, bias, labels, old, adv, ref, mask = ppo_case(b=1)
    cfg = {**BASE, "kl_coef": 0.1, "entropy_coef": 0.01}
    args = (hidden[0], weight, labels[0], old[0], adv[0], mask[0])
    with torch.no_grad():
        loss_ng, _ = fused_linear_ppo_loss(*args, ref_logprob=ref[0], bias=bias, **cfg)
    loss, _ = fused_linear_ppo_loss(hidden, weight, labels, old, adv, mask, ref_logprob=ref, bias=bias, **cfg)
    assert_close(loss_ng, loss, 1e-6, "no-grad loss")


# float64: every KL kind the op accepts x every agg mode; float32: the kinds once, at token-mean
COMPOSITION_CASES = [(k, a, torch.float64) for k in KL_KINDS for a in AGG_MODES] + [
    (k, "token-mean", torch.float32) for k in KL_KINDS
]


@pytest.mark.parametrize("kind,agg,dtype", COMPOSITION_CASES)
def test_ppo_matches_real_composition(kind, agg, dtype):
    """The fused loss's terms are the unfused ops' on the same log-probs: fused_linear_logprobs ->
    ppo_policy_loss + kl_coef * agg(kl_penalty) - entropy_coef * agg(entropy), loss, gradients and
    all five metrics."""
    case = [t.to(dtype) if t is not None and t.is_floating_point() else t for t in ppo_case()]
    hidden, weight, bias, labels, old, adv, ref, mask = case
    cfg = {**BASE, "dual_clip": 3.0, "kl_coef": 0.1, "kl_kind": kind, "entropy_coef": 0.01, "agg": agg}
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, metrics = fused_linear_ppo_loss(
        *leaves[:2], labels, old, adv, mask, ref_logprob=ref, bias=leaves[2], **cfg
    )
    got = (loss, *torch.autograd.grad(loss, leaves))
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    lp, ent = fused_linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], return_entropy=True)
    with backend("torch"):  # their reference backends: the semantics every backend of theirs matches
        pg, want_metrics = ppo_policy_loss(
            lp, old, adv, mask, cfg["clip_low"], cfg["clip_high"], cfg["dual_clip"], agg
        )
        kl = torch.where(mask, kl_penalty(lp, torch.where(mask, ref, lp.detach()), kind), 0.0)
    total = pg + cfg["kl_coef"] * agg_loss(kl, mask, agg) - cfg["entropy_coef"] * agg_loss(ent, mask, agg)
    want = (total, *torch.autograd.grad(total, leaves))
    want_metrics.update(kl=masked_mean(kl, mask), entropy=masked_mean(ent, mask))
    # agg_loss normalises and sums in fp32 whatever the input dtype, and metrics are fp32: in float64
    # these agree to fp32 rounding (a wrong formula is off by far more)
    tol = TOL[dtype] if dtype == torch.float32 else 1e-7
    for what, g, w in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, want):
        assert_close(g, w, tol, what)
    assert set(metrics) == set(want_metrics)
    for k, v in want_metrics.items():
        assert metrics[k].dtype == torch.float32
        assert_close(metrics[k], v, tol, k)


def test_ppo_bad_inputs_name_the_argument():
    hidden, weight, bias, labels, old, adv, ref, mask = ppo_case()
    f = fused_linear_ppo_loss
    with pytest.raises(ValueError, match="ref_logprob"):
        f(hidden, weight, labels, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="old_logprob"):
        f(hidden, weight, labels, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="mask"):
        f(hidden, weight, labels, old, adv, mask[:1])
    with pytest.raises(ValueError, match="kl_kind"):
        f(hidden, weight, labels, old, adv, mask, ref_logprob=ref, kl_kind="k9")
    with pytest.raises(ValueError, match="agg"):
        f(hidden, weight, labels, old, adv, mask, agg="mean")
    with pytest.raises(ValueError, match="dual_clip"):
        f(hidden, weight, labels, old, adv, mask, dual_clip=0.5)
    with pytest.raises(TypeError, match="advantages"):
        f(hidden, weight, labels, old, adv.long(), mask)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])  # "cpp" is "torch" here (see above)
@pytest.mark.parametrize("bad", [10, 12, -1, -7])
def test_labels_out_of_range_raise_on_every_backend(backend_name, bad):
    """A label >= V (or < 0 other than ignore_index) gave a plausible number on the chunked path:
    now every backend raises ValueError naming the op, the argument and the value, before any work."""
    hidden, weight, b, labels = make(6, 8, 10, bias=True)
    labels[4] = bad
    with backend(backend_name):
        with pytest.raises(ValueError, match=rf"^fused_linear_logprobs: labels: {bad} is outside \[0, 10\)"):
            fused_linear_logprobs(hidden, weight, labels, bias=b)
        with pytest.raises(ValueError, match=rf"labels: {bad} is outside"):
            plain = labels.masked_fill(
                labels == -100, 0
            ).int()  # -100 is a bad label with another ignore_index
            fused_linear_logprobs(hidden, weight, plain, return_entropy=True, ignore_index=-1000)
        lp_old, adv = torch.randn(6), torch.randn(6)
        mask = torch.ones(6)
        mask[4] = 0  # off the mask too: a label out of range there is a bug upstream
        with pytest.raises(ValueError, match=rf"^fused_linear_ppo_loss: labels: {bad} is outside"):
            fused_linear_ppo_loss(hidden, weight, labels, lp_old, adv, mask, bias=b)
        labels[4] = -100  # ignore_index stays allowed
        lp = fused_linear_logprobs(hidden, weight, labels, bias=b)
        assert torch.isfinite(lp).all() and lp[4] == 0
