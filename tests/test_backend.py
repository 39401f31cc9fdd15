"""Backend selection: the default per device, the explicit override, and its errors."""

import json
import subprocess
import sys

import pytest
import torch

from rlp_engine.ops import _backend
from rlp_engine.ops._backend import backend, current_backend, select


def test_default_cpu_is_cpp_and_override_nests():
    x = torch.randn(3)
    assert current_backend() is None
    assert select("op", x) == "cpp"
    with backend("torch"):
        assert select("op", x) == "torch"
        with backend("triton"):  # TRITON_INTERPRET=1 in tests, so triton runs on CPU tensors
            assert select("op", x) == "triton"
        assert current_backend() == "torch"
    assert current_backend() is None


def test_unknown_backend_and_unsupported_backend_are_errors():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"), backend("cuda"):
        pass
    with backend("triton"), pytest.raises(NotImplementedError, match="my_op: no 'triton' implementation"):
        select("my_op", torch.randn(2), supported=("torch", "cpp"))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        select("my_op", torch.randn(2))


def test_cpu_default_falls_back_to_torch_without_extension(monkeypatch):
    monkeypatch.setattr(_backend, "cpp_available", lambda: False)
    assert select("op", torch.randn(2)) == "torch"
    assert select("op", torch.randn(2), supported=("torch", "triton")) == "torch"


def test_cpp_on_a_non_cpu_device_without_kernel_is_an_error():
    x = torch.empty(2, device="meta")
    with backend("cpp"), pytest.raises(RuntimeError, match="no kernel for meta tensors"):
        select("compute_gae", x, cuda_op="gae")


# The extension's forward ops whose autograd formula rlp_engine.ops registers. The others are backward
# kernels, or rlp::gae, whose outputs are targets computed under no_grad.
DIFFERENTIABLE = {
    "kl_penalty",
    "ppo_policy_loss_fwd",
    "ppo_value_loss_fwd",
    "logprobs_fwd",
    "gaussian_skl_fwd",
}


def test_cpp_fake_kernels_and_autograd_registered_at_import():
    """Importing rlp_engine.ops registers every rlp:: op's fake (meta) kernel and the autograd
    formulas once, as the extension loads, not on an op's first call: a fresh interpreter that only
    imports the package (and calls no op) already has them all."""
    code = (
        "import json, torch\n"
        "import rlp_engine.ops\n"
        "has = torch._C._dispatch_has_kernel_for_dispatch_key\n"
        "names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith('rlp::')]\n"
        "print(json.dumps({n[5:]: [has(n, 'Meta'), has(n, 'Autograd')] for n in names}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.splitlines()[-1])
    assert DIFFERENTIABLE | {"gae", "kl_penalty_backward", "logprobs_bwd", "gaussian_skl_bwd"} <= set(got)
    assert [n for n, (meta, _) in got.items() if not meta] == [], "ops without a fake kernel"
    assert {n for n, (_, autograd) in got.items() if autograd} == DIFFERENTIABLE
