"""Check a torch.distributed.checkpoint (DCP) directory before `dcp.load` reads it.

DCP's FileSystemReader reads `.metadata` with plain `pickle.load`, and its default planner reads
every non-tensor entry (an optimizer's param_groups: lr, betas, ...) with
`torch.load(weights_only=False)`: a resume directory someone shares could run code on `--resume`.
`check_dcp_dir` reads the same bytes first, `.metadata` with an unpickler that builds only DCP's
metadata records and plain values, each non-tensor entry with `torch.load(weights_only=True)`, and
raises ConfigError naming the file when anything else is there. Tensor entries DCP itself loads
with weights_only=True.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from rlp_engine.config import ConfigError

# What torch 2.6-2.13 pickle into `.metadata` (looked up by name: a missing one is simply not allowed)
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # layout by name (torch.strided), as weights_only allows
    "torch": {"Size"},  # and the dtypes (torch.float32, ...), checked by type below
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata type")


def _refuse(path: Path, why: str) -> ConfigError:
    return ConfigError(
        f"resume: {path} is not a checkpoint rlp-engine wrote ({why}); it was not loaded, nothing in "
        "it was run: choose another --output-dir, or start over with --restart"
    )


def read_metadata(path: Path):
    """The DCP Metadata in file `path`, unpickled with only DCP's record types and plain values."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as f:
            meta = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, AttributeError, TypeError, ValueError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _refuse(path, first) from err
    if not isinstance(meta, Metadata):
        raise _refuse(path, f"it holds a {type(meta).__name__}, not a DCP Metadata")
    return meta


def _check_bytes_entries(root: Path, meta, where: Path) -> None:
    """torch.load(weights_only=True) of every non-tensor entry's bytes (DCP reads them unrestricted)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    fqns = {k for k, v in meta.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    for index, info in (getattr(meta, "storage_data", None) or {}).items():
        if getattr(index, "fqn", None) not in fqns:
            continue
        rel = str(info.relative_path)
        if Path(rel).name != rel or getattr(info, "transform_descriptors", None):
            raise _refuse(where, f"entry {index.fqn} points at {rel!r} or is transformed")
        with open(root / rel, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        try:
            torch.load(io.BytesIO(blob), weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure means: do not hand it to DCP
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise _refuse(root / rel, f"entry {index.fqn}: {first}") from err


def check_dcp_dir(root: Path) -> None:
    """Raise ConfigError unless every metadata file in DCP directory `root` holds only DCP records
    and every non-tensor entry loads with weights_only=True. Runs nothing from the files."""
    root = Path(root)
    names = sorted(p.name for p in root.iterdir() if p.name.endswith(".metadata")) if root.is_dir() else []
    if not names:
        raise _refuse(root, "no .metadata file")
    for name in names:
        meta = read_metadata(root / name)
        _check_bytes_entries(root, meta, root / name)
