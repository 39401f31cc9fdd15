"""Loaders for the real verl 0.9.1, TRL 1.12 and OpenRLHF 0.11 that rlp_engine.compat mimics, and
checks that what they load is the installed, pinned code.

scripts/setup.sh installs the three with `pip install --no-deps` (their full dependency lists pull
ray, vllm-era transformers pins, datasets/pyarrow, flash-attn, ...). Their loss modules import only
torch, but their packages' __init__ files and some module headers import those heavy packages. So the
needed module files are imported from the installed packages with the packages on the way made bare
(their directories, without running their __init__), and each unrelated import that is not installed
is a stub module whose attributes are placeholder classes, present only while the files load:
- verl: `verl/__init__` is skipped (it imports verl.protocol -> ray); stubs: tensordict (a type
  annotation in torch_functional), ray, orjson and codetiming (imported by the profiler and worker
  modules behind verl.workers.config, whose ActorConfig core_algos imports).
- TRL: `trl/__init__` and `trl/trainer/__init__` skipped (lazy-import tables plus compatibility
  patches of other libraries); stubs: pandas, datasets, pyarrow (table printing and dataset types).
- OpenRLHF: its package __init__ files skipped (they import the trainers); stubs: deepspeed (ZeRO-3
  leaf helper), ray and openrlhf.trainer.ray.launcher (the experience maker's worker groups).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import inspect
import os
import sys
import types
import zlib

import pytest
import torch

PINS = {"verl": "0.9.1", "trl": "1.12.0", "openrlhf": "0.11.2"}


class _Stub(types.ModuleType):
    """A stand-in for an unrelated, uninstalled module: every attribute is a placeholder class."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {"__module__": self.__name__, "__init__": lambda self, *a, **k: None})
        setattr(self, name, value)
        return value


def _installed_dir(dist: str) -> str:
    """The installed package's directory, skipping the test when it is not installed at the pin."""
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{dist}=={PINS[dist]} is not installed (scripts/setup.sh installs it)")
    if version != PINS[dist]:
        pytest.skip(f"{dist} {version} is installed; these tests compare with {PINS[dist]}")
    return str(importlib.metadata.distribution(dist).locate_file(dist))


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves a _Stub for each stubbed name and its submodules (`import pyarrow.types`)."""

    def __init__(self, names):
        self.names = names
        self.made = []

    def find_spec(self, name, path=None, target=None):
        if any(name == s or name.startswith(s + ".") for s in self.names):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        self.made.append(spec.name)
        return _Stub(spec.name)

    def exec_module(self, module):
        module.__path__ = []


@contextlib.contextmanager
def _stubbed(dist: str, stubs: list[str]):
    """Stub the modules in `stubs` (those of other distributions only when not installed) while the
    block runs; afterwards no stub is left in sys.modules."""
    missing = [
        s
        for s in stubs
        if s not in sys.modules and (s.split(".")[0] == dist or importlib.util.find_spec(s) is None)
    ]
    finder = _StubFinder(missing)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in finder.made:
            sys.modules.pop(name, None)


def _load(dist: str, bare: list[str], stubs: list[str], modules: list[str]) -> list[types.ModuleType]:
    """Import `modules` of the installed `dist` with the packages in `bare` left bare (their
    directory, no __init__) and the modules in `stubs` stubbed."""
    root = _installed_dir(dist)
    for name in bare:
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [os.path.join(os.path.dirname(root), *name.split("."))]
            pkg.__version__ = PINS[dist]
            sys.modules[name] = pkg
    with _stubbed(dist, stubs):
        return [importlib.import_module(m) for m in modules]


def upstream_test_module(dist: str, relpath: str, stubs: list[str] = ()) -> types.ModuleType:
    """One of the unit-test files that `dist`'s wheel installs (under site-packages/tests/), loaded
    under a private name after `dist`'s modules (so its imports of them find the loaded ones)."""
    path = os.path.join(os.path.dirname(_installed_dir(dist)), "tests", *relpath.split("/"))
    if not os.path.exists(path):
        pytest.skip(f"{dist}'s wheel has no tests/{relpath}")
    name = f"_upstream_{dist}_" + relpath.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    with _stubbed(dist, list(stubs)):
        spec.loader.exec_module(module)
    return module


_VERL_STUBS = ["tensordict", "ray", "orjson", "codetiming"]


@functools.cache
def verl_modules():
    """(core_algos, torch_functional) of the installed verl 0.9.1."""
    pytest.importorskip("omegaconf")
    pytest.importorskip("transformers")
    return _load(
        "verl",
        bare=["verl"],
        stubs=_VERL_STUBS,
        modules=["verl.trainer.ppo.core_algos", "verl.utils.torch_functional"],
    )


@functools.cache
def trl_modules():
    """(trl.trainer.utils, trl.experimental.ppo.ppo_trainer) of the installed TRL 1.12."""
    pytest.importorskip("accelerate")
    # Import what TRL needs from transformers before any stub exists, so that no availability
    # probe of transformers' sees a stub.
    importlib.import_module("transformers.modeling_utils")
    importlib.import_module("transformers.models.auto.auto_factory")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return _load(
        "trl",
        bare=["trl", "trl.trainer"],
        stubs=["pandas", "datasets", "pyarrow"],
        modules=["trl.trainer.utils", "trl.experimental.ppo.ppo_trainer"],
    )


@functools.cache
def openrlhf_modules():
    """(openrlhf.models.utils, the experience maker module) of the installed OpenRLHF 0.11.2."""
    pytest.importorskip("transformers")
    bare = ["openrlhf", "openrlhf.models", "openrlhf.trainer", "openrlhf.trainer.ppo_utils", "openrlhf.utils"]
    return _load(
        "openrlhf",
        bare=bare + ["openrlhf.trainer.ray"],
        stubs=["deepspeed", "ray", "openrlhf.trainer.ray.launcher"],
        modules=["openrlhf.models.utils", "openrlhf.trainer.ppo_utils.experience_maker"],
    )


def params(fn, drop_self=False):
    """(name, kind, default) of each parameter: what a drop-in must share (annotations may differ)."""
    ps = list(inspect.signature(fn).parameters.values())
    if drop_self:
        assert ps[0].name == "self"
        ps = ps[1:]
    return [(p.name, p.kind, p.default) for p in ps]


@pytest.mark.parametrize(
    "loader, dist, names",
    [
        (verl_modules, "verl", ["agg_loss", "logprobs_from_logits"]),
        (trl_modules, "trl", ["selective_log_softmax", "masked_whiten"]),
        (openrlhf_modules, "openrlhf", ["compute_approx_kl", "RemoteExperienceMaker"]),
    ],
)
def test_loaders_give_the_installed_pinned_code(loader, dist, names):
    mods = loader()
    root = _installed_dir(dist)
    for mod in mods:
        assert mod.__file__.startswith(root + os.sep), mod.__file__
    found = {n for mod in mods for n in names if hasattr(mod, n)}
    assert found == set(names)
    for stub in ("tensordict", "pandas", "datasets", "pyarrow", "ray"):
        assert not isinstance(sys.modules.get(stub), _Stub), f"stub {stub} left in sys.modules"


# ---- shared by the comparison tests -----------------------------------------------------------------

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
LOWP = (torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def seeded(request):
    """Fresh random inputs in every test, reproducible from the test's id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def to64(*tensors):
    """fp64 copies of the floating tensors (others, masks of any dtype too, unchanged): the inputs on
    which a peer's result is the reference for low-precision comparisons."""
    return [t.double() if t is not None and t.is_floating_point() and t.dtype in LOWP else t for t in tensors]


def check_like_peer(ours, theirs, ref64=None, lowp=None, rtol=1e-5, atol=1e-6):
    """ours has the peer's dtype and shape, and the peer's value: within (rtol, atol); or, for inputs
    of low precision `lowp`, ours' error against `ref64` (the peer on the same values in fp64) is at
    most twice the peer's own error plus half an ulp of `lowp` (flash-attention's rule). NaN must be
    where ref64 has NaN; where the peer's own low-precision result overflowed (inf, NaN), only the
    half ulp is allowed."""
    assert ours.dtype == theirs.dtype, (ours.dtype, theirs.dtype)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    if lowp is None:
        torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol, equal_nan=True)
        return
    ref, o, t = ref64.double(), ours.double(), theirs.double()
    nan = ref.isnan()
    assert torch.equal(o.isnan(), nan), "NaN where the peer's fp64 result has none, or the reverse"
    ref, o, t = ref[~nan], o[~nan], t[~nan]
    if ref.numel() == 0:
        return
    err_ours = (o - ref).abs().max().item()
    err_theirs = (t - ref).abs().nan_to_num(0.0, posinf=0.0).max().item()
    floor = torch.finfo(lowp).eps / 2 * max(ref.abs().max().item(), 1e-3)
    assert err_ours <= 2 * err_theirs + floor, (err_ours, err_theirs, floor)


def masks(B, T, dtypes=(torch.float32, torch.bool, torch.int64)):
    """Response masks [B, T] with holes, an empty row and a two-token row, in each of `dtypes`."""
    m = torch.rand(B, T) > 0.3
    m[1] = False
    m[2] = False
    m[2, :2] = True
    return [m.to(dt) for dt in dtypes]
