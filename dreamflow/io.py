"""Safe files: safetensors + JSON header for every state, atomic writes, checked output paths.

Nothing here unpickles. A state file is a ``.safetensors`` file whose metadata key ``"dreamflow"``
holds a JSON header ``{"format": ..., "version": ..., ...}``; tensors are plain named arrays.
Every write goes to a temporary file in the destination folder and is renamed into place, so an
interrupt or crash never leaves a partial file under the final name.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from typing import Dict, Iterator, Tuple

import torch

from .errors import DreamFlowError

#: Extensions of pickle-based formats; refused everywhere (loading one can execute code).
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_HEADER_KEY = "dreamflow"


def refuse_pickle(path: str, what: str = "file") -> None:
    """Raise if ``path`` is a pickle-based format, with the conversion recipe."""
    if str(path).lower().endswith(PICKLE_EXTENSIONS):
        raise DreamFlowError(
            f"refusing to load {what} '{path}': pickle-based formats ({', '.join(PICKLE_EXTENSIONS)}) can run code "
            f"when loaded; convert it to .safetensors first (e.g. in Python: safetensors.torch.save_file("
            f"torch.load(p, weights_only=True), p_out)) or use a diffusers folder"
        )


def _looks_like_safetensors(path: str) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length, then '{'."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < os.path.getsize(path)


def read_state_header(path: str):
    """The JSON header of a DreamFlow state file, or ``None`` for any other file.

    Reads only the safetensors header (8-byte length + JSON), never the tensors: cheap enough to list
    folders of states.
    """
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 1 < n < 100_000_000:
                return None
            meta = json.loads(f.read(n)).get("__metadata__") or {}
        header = json.loads(meta[_HEADER_KEY])
        return header if isinstance(header, dict) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, else delete it."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=".dreamflow-", suffix=suffix + ".part", dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_state_file(path: str, tensors: Dict[str, torch.Tensor], header: dict) -> str:
    """Write ``tensors`` and the JSON ``header`` (must hold ``format`` and ``version``) atomically."""
    from safetensors.torch import save_file

    if "format" not in header or "version" not in header:
        raise ValueError("state header needs 'format' and 'version'")
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, tmp, metadata={_HEADER_KEY: json.dumps(header, sort_keys=True)})
    return path


def load_state_file(path: str, fmt: str, version: int) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Read a state written by :func:`save_state_file`; checks format name and version.

    Raises DreamFlowError for a missing, pickle, truncated or foreign file, another format
    (e.g. a NeRF state given where a mesh state is needed) or an unknown version.
    """
    from safetensors import safe_open

    refuse_pickle(path, "state")
    if not os.path.isfile(path):
        raise DreamFlowError(f"state file '{path}' does not exist; check the path or save a state first")
    if not _looks_like_safetensors(path):
        raise DreamFlowError(f"state file '{path}' is not a safetensors file (corrupt or another format); re-save it with DreamFlow")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated / corrupt
        raise DreamFlowError(f"state file '{path}' is truncated or corrupt ({type(e).__name__}); re-save it") from None
    if _HEADER_KEY not in meta:
        raise DreamFlowError(f"'{path}' is a safetensors file but not a DreamFlow state (no '{_HEADER_KEY}' header)")
    try:
        header = json.loads(meta[_HEADER_KEY])
    except json.JSONDecodeError:
        raise DreamFlowError(f"state file '{path}' has a corrupt header; re-save it") from None
    if header.get("format") != fmt:
        raise DreamFlowError(
            f"'{path}' holds a {header.get('format')!r} state but a {fmt!r} state is needed here; connect the output of the right stage"
        )
    if header.get("version") != version:
        raise DreamFlowError(
            f"'{path}' is {fmt} format version {header.get('version')}, this DreamFlow reads version {version}; "
            f"re-create it with this version"
        )
    return tensors, header


def load_module_tensors(module: torch.nn.Module, tensors: Dict[str, torch.Tensor], prefix: str, source: str) -> None:
    """Load ``prefix``-ed entries of ``tensors`` into ``module``; missing/mismatched tensors are a clear error."""
    own = module.state_dict()
    sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing = sorted(set(own) - set(sub))
    extra = sorted(set(sub) - set(own))
    bad = sorted(k for k in set(own) & set(sub) if tuple(own[k].shape) != tuple(sub[k].shape))
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if extra:
            parts.append(f"unexpected {extra[:3]}")
        if bad:
            parts.append(f"shape mismatch {[(k, tuple(sub[k].shape), tuple(own[k].shape)) for k in bad[:3]]}")
        raise DreamFlowError(f"state '{source}' does not match its settings ({'; '.join(parts)}); the file is damaged or edited")
    module.load_state_dict(sub, strict=True)


# --------------------------------------------------------------------------------------------
# Output paths
# --------------------------------------------------------------------------------------------
_SAFE_PREFIX = re.compile(r"^[\w\-. /]+$")


def check_prefix(prefix: str) -> str:
    """Validate a filename prefix such as ``"dreamflow/corgi"``: relative, no ``..``, plain characters."""
    p = (prefix or "").strip().replace("\\", "/")
    if not p:
        raise DreamFlowError("filename prefix is empty; give one such as 'dreamflow/object'")
    if os.path.isabs(p) or p.startswith("/") or re.match(r"^[A-Za-z]:", p):
        raise DreamFlowError(f"filename prefix '{prefix}' is an absolute path; give a path relative to the output folder")
    if any(part == ".." for part in p.split("/")):
        raise DreamFlowError(f"filename prefix '{prefix}' contains '..'; outputs must stay inside the output folder")
    if not _SAFE_PREFIX.match(p):
        raise DreamFlowError(f"filename prefix '{prefix}' has characters other than letters, digits, '-', '_', '.', '/'")
    return p


def next_output_path(prefix: str, ext: str, output_dir: str | None = None) -> Tuple[str, str]:
    """Return ``(absolute_path, path_relative_to_output_dir)`` for a new ``<prefix>_00001_.<ext>``.

    Hosted, ComfyUI's ``folder_paths.get_save_image_path`` names the file (it refuses paths outside
    the output folder); headless, the same rule and counter are applied here.
    """
    from . import hosting

    prefix = check_prefix(prefix)
    fp = hosting.folder_paths()
    if fp is not None and output_dir is None:
        out = fp.get_output_directory()
        full_folder, filename, counter, subfolder, _ = fp.get_save_image_path(prefix, out)
    else:
        out = os.path.abspath(output_dir or hosting.output_directory())
        subfolder, filename = os.path.split(prefix)
        full_folder = os.path.join(out, subfolder)
        if os.path.commonpath([out, os.path.abspath(full_folder)]) != out:
            raise DreamFlowError(f"filename prefix '{prefix}' leaves the output folder")
        counter = 1
        if os.path.isdir(full_folder):
            pat = re.compile(re.escape(filename) + r"_(\d+)_")
            nums = [int(m.group(1)) for n in os.listdir(full_folder) if (m := pat.match(n))]
            counter = max(nums, default=0) + 1
    os.makedirs(full_folder, exist_ok=True)
    name = f"{filename}_{counter:05}_.{ext.lstrip('.')}"
    full = os.path.join(full_folder, name)
    rel = os.path.relpath(full, out).replace(os.sep, "/")
    return full, rel
