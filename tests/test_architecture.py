"""The layer rules of ARCHITECTURE.md, checked on the source text (ast): nothing here imports the
modules it checks, so a rule breaks with a list of offenders (file:line), never with an ImportError.

Layers, lowest first: ops (and kernels/) < models, data < algos < engine < recipes < pipeline < cli.
Each rule is one test; test_checkers_catch_what_they_look_for shows each checker flags a made-up
offender, so a rule that passes is not passing because its checker sees nothing."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "rlp_engine"
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 500
IMPORT_CALLS = ("import_module", "importlib.import_module")
ENV_GETTERS = ("os.environ.get", "environ.get", "os.getenv", "getenv")


def _source_files() -> list[Path]:
    """Every .py under rlp_engine/ plus kernels/ (installed as rlp_engine.kernels). os.walk does not
    follow the rlp_engine/kernels symlink, so kernels/ is listed once, from its real place."""
    files = []
    for top in (PKG, ROOT / "kernels"):
        for dirpath, dirnames, names in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            files += [Path(dirpath) / n for n in sorted(names) if n.endswith(".py")]
    return files


def _module_name(path: Path) -> str:
    """rlp_engine/engine/layout/fsdp.py -> rlp_engine.engine.layout.fsdp; kernels/gae.py ->
    rlp_engine.kernels.gae; a package's __init__.py -> the package."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    if rel[0] == "kernels":
        rel = ("rlp_engine", *rel)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


_TREES: dict[Path, ast.Module] = {}


def _tree(path: Path) -> ast.Module:
    if path not in _TREES:
        _TREES[path] = ast.parse(path.read_text(), filename=str(path))
    return _TREES[path]


def imported_modules(tree: ast.Module, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in `tree`, at any depth (a lazy import inside a
    function is still a dependency): `import a.b`, `from a import b` (as a and a.b, since b may be a
    submodule), relative imports resolved against `module`, and importlib.import_module("a.b")."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and _call_name(node.func) in IMPORT_CALLS:
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.JoinedStr) and arg.values:  # f"rlp_engine.models.{x}": its fixed head
                arg = arg.values[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((node.lineno, arg.value.rstrip(".")))
    return found


def _call_name(func: ast.expr) -> str:
    """os.environ.get -> "os.environ.get"; getenv -> "getenv"; anything else -> ""."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
        return ".".join(reversed(parts))
    return ""


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def import_offenders(layer: str, forbidden: tuple[str, ...]) -> list[str]:
    """file:line -> module for each import from rlp_engine/<layer>/ of a module under `forbidden`."""
    out = []
    for path in _source_files():
        module = _module_name(path)
        if not _under(module, (f"rlp_engine.{layer}",)):
            continue
        bad: dict[int, str] = {}  # one per line: `from a.b import c, d` names a.b, a.b.c and a.b.d
        for line, name in imported_modules(_tree(path), module, path.name == "__init__.py"):
            if _under(name, forbidden) and len(name) < len(bad.get(line, name + ".")):
                bad[line] = name
        out += [f"{_rel(path)}:{line} imports {name}" for line, name in sorted(bad.items())]
    return out


def _layer_names(*layers: str) -> tuple[str, ...]:
    return tuple(f"rlp_engine.{layer}" for layer in layers)


def _docstring_nodes(tree: ast.Module) -> set[int]:
    """ids of the docstring constants (module, class, function): prose may name a backend."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


BACKEND_WORDS = ("fsdp", "deepspeed", "dtensor", "fully_shard")


def backend_names(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, text) of every identifier, attribute, argument, definition or non-docstring string in
    `tree` that contains FSDP, DeepSpeed, DTensor or fully_shard (any case): a layout branch such as
    `if cfg.backend == "deepspeed"` or `isinstance(p, DTensor)` names one."""
    docs = _docstring_nodes(tree)
    found = []
    for node in ast.walk(tree):
        texts = []
        if isinstance(node, ast.Name):
            texts = [node.id]
        elif isinstance(node, ast.Attribute):
            texts = [node.attr]
        elif isinstance(node, ast.alias):
            texts = [node.name, node.asname or ""]
        elif isinstance(node, ast.arg):
            texts = [node.arg]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            texts = [node.name]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            texts = [node.value]
        for text in texts:
            if any(word in text.lower() for word in BACKEND_WORDS):
                found.append((getattr(node, "lineno", 0), text))
    return found


def _env_key_names(tree: ast.Module) -> dict[str, str]:
    """Module-level NAME = "RLP_ENGINE_..." constants, so os.environ.get(NAME) counts too."""
    names = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name) and isinstance(node.value.value, str):
                    names[target.id] = node.value.value
    return names


def _env_key(node: ast.expr | None, names: dict[str, str]) -> str:
    if isinstance(node, ast.JoinedStr) and node.values:
        node = node.values[0]
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return names.get(node.id, "")
    return ""


def _is_environ(node: ast.expr) -> bool:
    return _call_name(node) in ("os.environ", "environ")


def env_reads(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, key) of each read of an RLP_ENGINE_* variable: os.environ[k], os.environ.get(k),
    os.getenv(k), k in os.environ. Setting one (for a child process) is not a read."""
    names = _env_key_names(tree)
    found = []
    for node in ast.walk(tree):
        key = ""
        if isinstance(node, ast.Call) and _call_name(node.func) in ENV_GETTERS:
            key = _env_key(node.args[0] if node.args else None, names)
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _is_environ(node.value):
            key = _env_key(node.slice, names)
        elif isinstance(node, ast.Compare) and any(_is_environ(c) for c in node.comparators):
            key = _env_key(node.left, names)
        if key.startswith("RLP_ENGINE_"):
            found.append((node.lineno, key))
    return found


def long_functions(tree: ast.Module, limit: int = MAX_FUNCTION_LINES) -> list[tuple[int, str, int]]:
    """(line, name, length) of each def longer than `limit` lines, from `def` to its last line."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                out.append((node.lineno, node.name, length))
    return out


def _fail_if(offenders: list[str], rule: str) -> None:
    assert not offenders, f"{rule}; {len(offenders)} offender(s):\n" + "\n".join(offenders)


# --- the rules -----------------------------------------------------------------------------------


def test_algos_import_no_engine_recipes_pipeline_or_distributed():
    forbidden = (*_layer_names("engine", "recipes", "pipeline"), "torch.distributed", "deepspeed")
    _fail_if(import_offenders("algos", forbidden), "algos/ is pure math: it imports no layout code")


def test_algos_never_name_a_training_layout():
    offenders = []
    for path in _source_files():
        if _under(_module_name(path), ("rlp_engine.algos",)):
            offenders += [f"{_rel(path)}:{line} {text!r}" for line, text in backend_names(_tree(path))]
    _fail_if(offenders, "algos/ never names FSDP, DeepSpeed, DTensor or fully_shard (the TrainHandle does)")


def test_ops_import_no_higher_layer():
    forbidden = _layer_names("algos", "models", "data", "engine", "recipes", "pipeline")
    _fail_if(import_offenders("ops", forbidden), "ops/ is the bottom layer")


def test_kernels_import_no_higher_layer():
    forbidden = _layer_names("ops", "algos", "models", "data", "engine", "recipes", "pipeline")
    _fail_if(import_offenders("kernels", forbidden), "kernels/ sit under ops/")


@pytest.mark.parametrize("layer", ["models", "data"])
def test_models_and_data_import_no_higher_layer(layer):
    forbidden = _layer_names("algos", "engine", "recipes", "pipeline")
    _fail_if(import_offenders(layer, forbidden), f"{layer}/ sits under algos/engine/recipes/pipeline")


def test_engine_imports_no_algos_recipes_or_pipeline():
    forbidden = _layer_names("algos", "recipes", "pipeline")
    _fail_if(import_offenders("engine", forbidden), "engine/ serves recipes; it imports none of them")


def test_recipes_import_no_pipeline():
    _fail_if(import_offenders("recipes", _layer_names("pipeline")), "recipes/ sit under pipeline/")


def test_no_production_module_reads_an_rlp_engine_environment_variable():
    offenders = []
    for path in _source_files():
        offenders += [f"{_rel(path)}:{line} reads {key}" for line, key in env_reads(_tree(path))]
    _fail_if(offenders, "faults and options come in through arguments (a hook, the config), not RLP_ENGINE_*")


def test_functions_are_at_most_80_lines():
    offenders = []
    for path in _source_files():
        for line, name, length in long_functions(_tree(path)):
            offenders.append(f"{_rel(path)}:{line} {name}() is {length} lines")
    _fail_if(offenders, f"functions are at most {MAX_FUNCTION_LINES} lines")


def test_files_are_at_most_500_lines():
    offenders = []
    for path in _source_files():
        n = len(path.read_text().splitlines())
        if n > MAX_FILE_LINES:
            offenders.append(f"{_rel(path)}:1 is {n} lines")
    _fail_if(offenders, f"files are at most {MAX_FILE_LINES} lines")


# --- the checkers can fail -----------------------------------------------------------------------

BAD = '''"""A docstring may say FSDP, DeepSpeed and RLP_ENGINE_X."""
import os
import torch.distributed as dist
from ..engine.layout import fsdp
from rlp_engine import pipeline
KEY = "RLP_ENGINE_FAIL_AT"


def step(model, use_fsdp):
    import importlib
    importlib.import_module(f"rlp_engine.recipes.{use_fsdp}")
    if isinstance(model, DTensor) or os.environ.get(KEY) or "RLP_ENGINE_Y" in os.environ:
        return os.getenv("RLP_ENGINE_Z") or os.environ["RLP_ENGINE_W"]
    os.environ["RLP_ENGINE_SET"] = "1"
    return "deepspeed"
'''


def test_checkers_catch_what_they_look_for():
    tree = ast.parse(BAD)
    imports = {name for _, name in imported_modules(tree, "rlp_engine.algos.bad", is_package=False)}
    assert {"torch.distributed", "rlp_engine.engine.layout.fsdp", "rlp_engine.pipeline"} <= imports
    assert "rlp_engine.recipes" in imports  # the f-string's fixed head
    named = {text for _, text in backend_names(tree)}
    assert named == {"use_fsdp", "DTensor", "deepspeed", "fsdp"}  # docstring prose is allowed
    assert sorted(key for _, key in env_reads(tree)) == [
        "RLP_ENGINE_FAIL_AT",
        "RLP_ENGINE_W",
        "RLP_ENGINE_Y",
        "RLP_ENGINE_Z",
    ]  # the assignment to RLP_ENGINE_SET is not a read
    assert [(name, n) for _, name, n in long_functions(tree, limit=6)] == [("step", 7)]
    assert long_functions(tree, limit=7) == []
    # a relative import from a package's __init__ resolves against the package itself
    init = ast.parse("from . import ppo\nfrom .. import engine\n")
    names = {name for _, name in imported_modules(init, "rlp_engine.algos", is_package=True)}
    assert {"rlp_engine.algos.ppo", "rlp_engine.engine"} <= names


def test_source_walk_sees_every_layer_and_kernels_once():
    modules = [_module_name(p) for p in _source_files()]
    assert len(modules) == len(set(modules))  # the rlp_engine/kernels symlink is not walked twice
    for layer in ("ops", "kernels", "algos", "models", "data", "engine", "pipeline"):
        assert any(_under(m, (f"rlp_engine.{layer}",)) for m in modules), layer


# --- the repo's kernels/ never shadows Hugging Face's `kernels` -----------------------------------


def _import_kernels_from_root(extra_path: str | None = None) -> str:
    """Runs `import kernels` with the repo root first on sys.path (as `python -c` and
    `python -m pytest` from the root do) -> where it came from."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "if len(sys.argv) > 2: sys.path.insert(1, sys.argv[2])\n"
        "try:\n    import kernels\nexcept ImportError:\n    print('none'); raise SystemExit\n"
        "print(getattr(kernels, '__file__', None) or 'namespace:' + ';'.join(kernels.__path__))"
    )
    args = [sys.executable, "-I", "-c", code, str(ROOT)] + ([extra_path] if extra_path else [])
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def test_repo_kernels_dir_is_not_a_regular_package():
    # A regular package at the repo root would win over site-packages' `kernels` (cwd comes first);
    # a namespace directory loses to any regular package on sys.path.
    assert not list((ROOT / "kernels").glob("__init__.*"))
    assert (PKG / "kernels").resolve() == (ROOT / "kernels").resolve()  # rlp_engine.kernels' source


def test_import_kernels_from_the_root_finds_the_installed_package(tmp_path):
    # Stands in for Hugging Face's `kernels` in site-packages: a regular package after the root.
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    where = _import_kernels_from_root(str(tmp_path))
    assert where == str(tmp_path / "kernels" / "__init__.py")
    # Without one, `import kernels` is at most an empty namespace: none of our modules is imported.
    # With HF's installed (transformers >= 5.25 brings it; in CI the venv lives inside the repo), it
    # is HF's file, never one under the repo's kernels/.
    alone = _import_kernels_from_root()
    ours = str(ROOT / "kernels") + os.sep
    assert alone == "none" or alone.startswith("namespace:") or not alone.startswith(ours), alone
