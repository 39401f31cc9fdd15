"""Information-bottleneck pieces (RLP-UML): symmetric Gaussian KL on every backend against the
float64 closed form, the JSD mutual-information bound on hand-worked values, the multi-view loss
(roll-one negatives against its composition, in-batch all-pairs negatives against a float64
pair-by-pair reference, forward and every gradient)."""

import math

import pytest
import torch
from conftest import device_for

from rlp_engine.models.heads import GaussianEncoder
from rlp_engine.ops import backend, gaussian_symmetric_kl, jsd_mi_lower_bound, multiview_ib_loss


def _closed_form(mu1, logvar1, mu2, logvar2):
    """SKL exactly as DESIGN writes it (float64 by the caller)."""
    s1, s2, d2 = logvar1.exp(), logvar2.exp(), (mu1 - mu2) ** 2
    return 0.25 * ((s1 + d2) / s2 + (s2 + d2) / s1 - 2).sum(-1)


def _gaussians(shape, device, dtype=torch.float32):
    mu1, mu2 = torch.randn(shape, device=device), torch.randn(shape, device=device)
    lv1, lv2 = torch.randn(shape, device=device) * 0.7, torch.randn(shape, device=device) * 0.7
    return [t.to(dtype) for t in (mu1, lv1, mu2, lv2)]


def _skl_and_grads(backend_name, inputs, g):
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    with backend(backend_name):
        out = gaussian_symmetric_kl(*xs)
    (out * g.to(out.dtype)).sum().backward()
    return out, [x.grad for x in xs]


def _reference(inputs, g):
    xs = [t.detach().double().requires_grad_() for t in inputs]
    out = _closed_form(*xs)
    (out * g.double()).sum().backward()
    return out, [x.grad for x in xs]


@pytest.mark.parametrize("shape", [(3, 5, 37), (1, 1), (9, 300)])
def test_skl_matches_closed_form(backend_name, shape):
    inputs = _gaussians(shape, device_for(backend_name))
    g = torch.randn(shape[:-1], device=inputs[0].device)
    out, grads = _skl_and_grads(backend_name, inputs, g)
    assert out.dtype == torch.float32 and out.shape == shape[:-1]
    ref, ref_grads = _reference(inputs, g)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_skl_is_mean_of_both_kls_from_torch_distributions(backend_name):
    mu1, lv1, mu2, lv2 = _gaussians((4, 16), device_for(backend_name))
    p = torch.distributions.Normal(mu1.double(), (0.5 * lv1.double()).exp())
    q = torch.distributions.Normal(mu2.double(), (0.5 * lv2.double()).exp())
    kl = torch.distributions.kl_divergence
    want = 0.5 * (kl(p, q) + kl(q, p)).sum(-1)
    with backend(backend_name):
        got = gaussian_symmetric_kl(mu1, lv1, mu2, lv2)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_skl_close_variances_keep_relative_accuracy(backend_name):
    # logvar1 - logvar2 = 1e-3, equal means: SKL = 1/4 D (e^(dl/2) - e^(-dl/2))^2 ~ 2.5e-7 D. Summing
    # a + 1/a - 2 in fp32 would lose it to cancellation (error ~ 1e-7 per dim, i.e. about 40%).
    dev = device_for(backend_name)
    mu = torch.randn(3, 8, device=dev)
    lv2 = torch.randn(3, 8, device=dev)
    lv1 = lv2 + 1e-3
    with backend(backend_name):
        got = gaussian_symmetric_kl(mu, lv1, mu.clone(), lv2)
    want = _closed_form(mu.double(), lv1.double(), mu.double(), lv2.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=0)


def test_skl_bf16_within_twice_torch_error(backend_name):
    inputs = _gaussians((6, 64), device_for(backend_name), torch.bfloat16)
    g = torch.randn(6, device=inputs[0].device)
    out, grads = _skl_and_grads(backend_name, inputs, g)
    ref, ref_grads = _reference(inputs, g)
    plain = [t.detach().clone().requires_grad_() for t in inputs]
    t_out = _closed_form(*plain)  # plain torch, in bf16
    (t_out * g.to(torch.bfloat16)).sum().backward()
    pairs = [(out, t_out, ref)] + [(a, p.grad, r) for a, p, r in zip(grads, plain, ref_grads)]
    for ours, theirs, want in pairs:
        assert ours.dtype == (torch.float32 if ours is out else torch.bfloat16)
        err, torch_err = (ours.double() - want).abs().max(), (theirs.double() - want).abs().max()
        assert err <= 2 * torch_err + 1e-5, (err, torch_err)


def test_skl_opcheck_cpp_ops():
    mu1, lv1, mu2, lv2 = _gaussians((5, 11), "cpu")
    args = tuple(t.clone().requires_grad_() for t in (mu1, lv1, mu2, lv2))
    torch.library.opcheck(torch.ops.rlp.gaussian_skl_fwd.default, args)
    torch.library.opcheck(torch.ops.rlp.gaussian_skl_bwd.default, (torch.randn(5), mu1, lv1, mu2, lv2))


def test_skl_errors(backend_name):
    mu1, lv1, mu2, lv2 = _gaussians((4, 8), device_for(backend_name))
    with backend(backend_name):
        with pytest.raises(ValueError, match=r"logvar2 has shape \(4, 7\) but mu1 has shape \(4, 8\)"):
            gaussian_symmetric_kl(mu1, lv1, mu2, lv2[:, :7])
        with pytest.raises(TypeError, match="mu2 has dtype torch.float64 but mu1 has dtype torch.float32"):
            gaussian_symmetric_kl(mu1, lv1, mu2.double(), lv2)
        with pytest.raises(TypeError, match="logvar1 must be a floating-point"):
            gaussian_symmetric_kl(mu1, lv1.long(), mu2, lv2)
        with pytest.raises(ValueError, match="D >= 1"):
            empty = torch.randn(4, 0)
            gaussian_symmetric_kl(empty, empty, empty, empty)


def test_jsd_bound_hand_worked():
    # pos = [0, ln 3]: -softplus(0) = -ln 2, -softplus(-ln 3) = -ln(4/3); mean -ln(8/3) / 2.
    # neg = [0, -ln 3]: softplus(0) = ln 2, softplus(-ln 3) = ln(4/3);   mean  ln(8/3) / 2.
    # I = -ln(8/3) / 2 - ln(8/3) / 2 = -ln(8/3).
    pos = torch.tensor([0.0, math.log(3)], requires_grad=True)
    neg = torch.tensor([0.0, -math.log(3)], requires_grad=True)
    got = jsd_mi_lower_bound(pos, neg)
    assert got.shape == () and got.dtype == torch.float32
    assert got.item() == pytest.approx(-math.log(8 / 3), abs=1e-6)
    got.backward()
    # dI/dpos = sigmoid(-T) / 2 = [1/4, 1/8]; dI/dneg = -sigmoid(T) / 2 = [-1/4, -1/8].
    torch.testing.assert_close(pos.grad, torch.tensor([0.25, 0.125]))
    torch.testing.assert_close(neg.grad, torch.tensor([-0.25, -0.125]))


def test_jsd_bound_is_stable_for_large_scores():
    # A perfect critic: I -> 0 from below, no overflow. A wrong one: I = -(100 + 100) / 1 = -200.
    good = jsd_mi_lower_bound(torch.tensor([100.0, 200.0]), torch.tensor([-100.0, -300.0]))
    bad = jsd_mi_lower_bound(torch.tensor([-100.0]), torch.tensor([100.0]))
    assert good.item() == pytest.approx(0.0, abs=1e-30)
    assert bad.item() == pytest.approx(-200.0, rel=1e-6)


def test_jsd_errors():
    with pytest.raises(ValueError, match="scores_neg is empty"):
        jsd_mi_lower_bound(torch.randn(3), torch.randn(0))
    with pytest.raises(TypeError, match="scores_pos must be a floating-point"):
        jsd_mi_lower_bound(torch.ones(3, dtype=torch.long), torch.randn(3))


class _BilinearCritic(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(dim, dim) * 0.3)

    def forward(self, z1, z2):
        return ((z1 @ self.w) * z2).sum(-1)


def test_multiview_loss_matches_composition(backend_name):
    dev = device_for(backend_name)
    mu1, lv1, mu2, lv2 = (t.requires_grad_() for t in _gaussians((6, 5), dev))
    critic = _BilinearCritic(5).to(dev)
    with backend(backend_name):
        loss, metrics = multiview_ib_loss(
            mu1,
            lv1,
            mu2,
            lv2,
            critic,
            beta=0.5,
            generator=torch.Generator(dev).manual_seed(7),
            negatives="roll",
        )
    gen = torch.Generator(dev).manual_seed(7)
    eps1, eps2 = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    with torch.no_grad():
        z1, z2 = mu1 + (0.5 * lv1).exp() * eps1, mu2 + (0.5 * lv2).exp() * eps2
        pos, neg = critic(z1, z2), critic(z1, z2[[5, 0, 1, 2, 3, 4]])
        mi = (-torch.nn.functional.softplus(-pos)).mean() - torch.nn.functional.softplus(neg).mean()
        skl = _closed_form(mu1.double(), lv1.double(), mu2.double(), lv2.double()).mean()
    torch.testing.assert_close(metrics["mi"], mi)
    torch.testing.assert_close(metrics["skl"].double(), skl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss.double(), -mi.double() + 0.5 * skl, atol=1e-5, rtol=1e-5)
    assert metrics["mi"].shape == metrics["skl"].shape == () and not metrics["mi"].requires_grad
    loss.backward()
    for t in (mu1, lv1, mu2, lv2, critic.w):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def _all_pairs_reference(inputs, critic_params, critic_fn, eps, beta):
    """L_M with every off-diagonal pair a negative, pair by pair in float64: (loss, mi, skl, grads of
    the four inputs and of the critic's parameters)."""
    xs = [t.detach().double().requires_grad_() for t in inputs]
    ps = [p.detach().double().requires_grad_() for p in critic_params]
    mu1, lv1, mu2, lv2 = xs
    z1, z2 = mu1 + (0.5 * lv1).exp() * eps[0].double(), mu2 + (0.5 * lv2).exp() * eps[1].double()
    n = mu1.shape[0]
    sp = torch.nn.functional.softplus
    pos = [-sp(-critic_fn(ps, z1[i], z2[i])) for i in range(n)]
    neg = [sp(critic_fn(ps, z1[i], z2[j])) for i in range(n) for j in range(n) if j != i]
    assert len(neg) == n * (n - 1)
    mi = torch.stack(pos).mean() - torch.stack(neg).mean()
    skl = _closed_form(*xs).mean()
    loss = -mi + beta * skl
    grads = torch.autograd.grad(loss, xs + ps)
    return loss.detach(), mi.detach(), skl.detach(), grads


def _separable_critic(dim, dev):
    """GaussianEncoder's critic (a matrix in one call) and its float64 pairwise form."""
    enc = GaussianEncoder(3, dim).to(dev)
    torch.nn.init.normal_(enc.proj.weight, std=0.8)  # scores well away from 0
    params = [enc.proj.weight, enc.proj.bias]

    def pairwise(ps, a, b):
        w, bias = ps
        return ((w @ a + bias) * (w @ b + bias)).sum() * dim**-0.5

    return enc.critic, {"critic_matrix": enc.critic_matrix}, params, pairwise


def _bilinear_critic(dim, dev):
    """A critic with no matrix form: the op calls it on the N^2 pairs."""
    critic = _BilinearCritic(dim).to(dev)
    return critic, {}, [critic.w], lambda ps, a, b: (a @ ps[0]) @ b


@pytest.mark.parametrize("n", [2, 5, 7])
@pytest.mark.parametrize("make_critic", [_separable_critic, _bilinear_critic], ids=["matrix", "pairs"])
def test_multiview_all_pairs_matches_float64_reference(backend_name, n, make_critic):
    dev = device_for(backend_name)
    inputs = [t.requires_grad_() for t in _gaussians((n, 6), dev)]
    critic, kw, params, pairwise = make_critic(6, dev)
    with backend(backend_name):
        loss, metrics = multiview_ib_loss(
            *inputs, critic, beta=0.3, generator=torch.Generator(dev).manual_seed(11), **kw
        )
    loss.backward()
    gen = torch.Generator(dev).manual_seed(11)  # the op draws eps1 then eps2 from its generator
    eps = [torch.randn(n, 6, generator=gen, device=dev) for _ in range(2)]
    ref_loss, ref_mi, ref_skl, ref_grads = _all_pairs_reference(inputs, params, pairwise, eps, 0.3)
    assert loss.dtype == metrics["mi"].dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["mi"].double(), ref_mi, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["skl"].double(), ref_skl, atol=1e-5, rtol=1e-5)
    assert ref_mi > -50  # the critic's scores are O(1): softplus is not in its linear tail
    for got, want in zip([t.grad for t in inputs + params], ref_grads):
        assert got.dtype == torch.float32 and want.abs().sum() > 0
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_multiview_all_pairs_default_and_matrix_equal_pairwise_calls():
    # "all" is the default; a critic_matrix gives the same numbers as N^2 calls of the pair critic.
    inputs = _gaussians((5, 4), "cpu")
    enc = GaussianEncoder(3, 4)
    a = multiview_ib_loss(*inputs, enc.critic, generator=torch.Generator().manual_seed(2))[1]["mi"]
    b = multiview_ib_loss(
        *inputs, enc.critic, generator=torch.Generator().manual_seed(2), critic_matrix=enc.critic_matrix
    )[1]["mi"]
    c = multiview_ib_loss(*inputs, enc.critic, generator=torch.Generator().manual_seed(2), negatives="roll")[
        1
    ]
    torch.testing.assert_close(a, b)
    assert (a - c["mi"]).abs() > 1e-4  # roll-one is a different estimate


def test_multiview_loss_decreases_as_views_agree():
    # Far-apart samples, a critic that scores closeness: moving mu2 toward mu1 lowers the SKL and
    # raises the positives' scores, so the loss must fall at every step (same noise each time).
    mu1 = torch.randn(8, 4) * 5
    lv1, lv2 = torch.randn(8, 4) * 0.3, torch.randn(8, 4) * 0.3
    far = mu1 + torch.randn(8, 4) * 3
    critic = lambda z1, z2: 2.0 - ((z1 - z2) ** 2).sum(-1)
    losses = []
    for frac in (0.0, 0.5, 0.9, 1.0):
        mu2 = far + frac * (mu1 - far)
        loss, _ = multiview_ib_loss(mu1, lv1, mu2, lv2, critic, generator=torch.Generator().manual_seed(0))
        losses.append(loss.item())
    assert all(a > b for a, b in zip(losses, losses[1:])), losses


def test_multiview_errors():
    mu1, lv1, mu2, lv2 = _gaussians((4, 3), "cpu")
    critic = lambda z1, z2: (z1 * z2).sum(-1)
    with pytest.raises(ValueError, match="N >= 2"):
        multiview_ib_loss(mu1[:1], lv1[:1], mu2[:1], lv2[:1], critic)
    with pytest.raises(TypeError, match="critic must be callable"):
        multiview_ib_loss(mu1, lv1, mu2, lv2, critic=3)
    with pytest.raises(ValueError, match="critic must return 4 scores for the positive pairs"):
        multiview_ib_loss(mu1, lv1, mu2, lv2, critic=lambda z1, z2: z1 * z2, negatives="roll")
    with pytest.raises(ValueError, match=r"mu2 has shape \(4, 2\) but mu1 has shape \(4, 3\)"):
        multiview_ib_loss(mu1, lv1, mu2[:, :2], lv2, critic)
    with pytest.raises(ValueError, match=r"mu1 must be \[N, D\]"):
        multiview_ib_loss(mu1[None], lv1[None], mu2[None], lv2[None], critic)
    with pytest.raises(ValueError, match=r"unknown negatives 'next'; expected one of \('all', 'roll'\)"):
        multiview_ib_loss(mu1, lv1, mu2, lv2, critic, negatives="next")
    with pytest.raises(ValueError, match=r"critic must return 16 scores for the 4 x 4 pairs, got \(\)"):
        multiview_ib_loss(mu1, lv1, mu2, lv2, critic=lambda z1, z2: (z1 * z2).sum())
    with pytest.raises(ValueError, match=r"critic_matrix must return a \(4, 4\) score matrix, got \(4,\)"):
        multiview_ib_loss(mu1, lv1, mu2, lv2, critic, critic_matrix=critic)
    with pytest.raises(TypeError, match="critic_matrix must be callable"):
        multiview_ib_loss(mu1, lv1, mu2, lv2, critic, critic_matrix=torch.ones(4, 4))
