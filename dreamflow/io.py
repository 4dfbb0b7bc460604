"""Safe files: safetensors + JSON header for every state, atomic writes, checked output paths.

Nothing here unpickles. A state file is a ``.safetensors`` file whose metadata key ``"dreamflow"``
holds a JSON header ``{"format": ..., "version": ..., ...}``; tensors are plain named arrays.
Every write goes to a temporary file in the destination folder and is renamed into place, so an
interrupt or crash never leaves a partial file under the final name.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

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


def as_path(path, what: str = "file") -> str:
    """``path`` as text (str or os.PathLike); anything else (None, a number) is a one-line DreamFlowError."""
    try:
        path = os.fspath(path)
    except TypeError:
        raise DreamFlowError(f"{what} {str(path)[:60]!r} is not a path; give the file's path as text") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path or "\0" in path:
        raise DreamFlowError(f"{what} path {path!r} is empty or holds a NUL character; give the file's path")
    return path


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
    if not isinstance(path, (str, os.PathLike)):  # open(5) would read (and close) file descriptor 5
        return None
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 1 < n < MAX_HEADER_BYTES:
                return None
            meta = json.loads(f.read(n)).get("__metadata__") or {}
        header = json.loads(meta[_HEADER_KEY])
        return header if isinstance(header, dict) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None


#: Largest safetensors JSON header read (the tensors' table of contents); DreamFlow's are a few kB.
MAX_HEADER_BYTES = 100_000_000
#: Largest total of tensor bytes a state file may hold (a default NeRF state holds ~70 MB); a bigger claim is
#: refused before anything is read or allocated.
MAX_STATE_BYTES = 4 << 30
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
#: safetensors dtype names of torch dtypes (what :func:`tensor_specs` reports).
DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}


@dataclass
class StateFile:
    """A checked state file before its tensors are read: its header and its tensors' shapes and dtypes.

    Built by :func:`inspect_state_file`; the caller compares ``specs`` with what its settings imply
    (:func:`check_tensor_specs`) and only then calls :meth:`tensors`.
    """

    path: str
    header: dict
    specs: Dict[str, Tuple[Tuple[int, ...], str]]
    """tensor name -> (shape, safetensors dtype name such as "F32")."""

    def tensors(self, names: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
        """Read the tensors (all, or ``names``): allocates exactly the checked sizes."""
        from safetensors import safe_open

        try:
            with safe_open(self.path, framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in (self.specs if names is None else names)}
        except Exception as e:  # changed or truncated since it was inspected
            raise DreamFlowError(f"state file '{self.path}' is truncated or corrupt ({type(e).__name__}); "
                                 f"re-save it") from None


def inspect_state_file(path: str, fmt: Optional[str], version: int) -> StateFile:
    """The one checked reader of state files: header and tensor table only, never the tensor data.

    Refuses (one-line DreamFlowError) a missing path, a folder, a pickle, a file that is not safetensors, a
    header that is not a JSON object or lacks DreamFlow's, another ``fmt`` (``None``: any DreamFlow state) or
    version, and tensor tables claiming more than :data:`MAX_STATE_BYTES` or more bytes than the file holds.
    """
    from safetensors import safe_open

    path = as_path(path, "state file")
    refuse_pickle(path, "state")
    if not os.path.exists(path):
        raise DreamFlowError(f"state file '{path}' does not exist; check the path or save a state first")
    if not os.path.isfile(path):
        raise DreamFlowError(f"state file '{path}' is not a file (a folder?); give the path of a .safetensors state")
    if not _looks_like_safetensors(path):
        raise DreamFlowError(f"state file '{path}' is not a safetensors file (corrupt or another format); re-save it with DreamFlow")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            specs = {}
            for k in f.keys():
                sl = f.get_slice(k)
                specs[k] = (tuple(int(n) for n in sl.get_shape()), str(sl.get_dtype()))
    except Exception as e:  # truncated / corrupt / unreadable
        raise DreamFlowError(f"state file '{path}' is truncated or corrupt ({type(e).__name__}); re-save it") from None
    if _HEADER_KEY not in meta:
        raise DreamFlowError(f"'{path}' is a safetensors file but not a DreamFlow state (no '{_HEADER_KEY}' header)")
    try:
        header = json.loads(meta[_HEADER_KEY])
    except (ValueError, RecursionError):
        raise DreamFlowError(f"state file '{path}' has a corrupt header (not JSON); re-save it") from None
    if not isinstance(header, dict):
        raise DreamFlowError(f"state file '{path}' has a header that is a JSON {type(header).__name__}, not an object; "
                             f"the file is damaged or was not written by DreamFlow: re-save it")
    if fmt is not None and header.get("format") != fmt:
        raise DreamFlowError(
            f"'{path}' holds a {header.get('format')!r} state but a {fmt!r} state is needed here; connect the output of the right stage"
        )
    if header.get("version") != version:
        raise DreamFlowError(
            f"'{path}' is {header.get('format')} format version {header.get('version')!r}, this DreamFlow reads version "
            f"{version}; re-create it with this version"
        )
    total = 0
    for k, (shape, dtype) in specs.items():
        n = 1
        for d in shape:
            n *= d
        total += n * _DTYPE_BYTES.get(dtype, 8)
    if total > MAX_STATE_BYTES:
        raise DreamFlowError(f"state file '{path}' claims {total / 2**30:.1f} GiB of tensors, more than the "
                             f"{MAX_STATE_BYTES >> 30} GiB a DreamFlow state may hold; the file is damaged or hostile")
    return StateFile(path, header, specs)


def check_tensor_specs(source: str, specs: Dict[str, Tuple[Tuple[int, ...], str]],
                       expected: Dict[str, Tuple[Tuple[int, ...], str]], prefix: str = "") -> None:
    """The ``prefix``-ed tensors of a file match ``expected`` (name -> (shape, dtype name)) exactly.

    Missing, unexpected, mis-shaped and mis-typed tensors are one DreamFlowError, raised before any tensor
    is read or any module of that size is built.
    """
    sub = {k[len(prefix):]: v for k, v in specs.items() if k.startswith(prefix)}
    missing = sorted(set(expected) - set(sub))
    extra = sorted(set(sub) - set(expected))
    bad = sorted(k for k in set(expected) & set(sub) if sub[k][0] != tuple(expected[k][0]))
    wrong = sorted(k for k in set(expected) & set(sub) if k not in bad and sub[k][1] != expected[k][1])
    if missing or extra or bad or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if extra:
            parts.append(f"unexpected {extra[:3]}")
        if bad:
            parts.append(f"shape mismatch {[(k, sub[k][0], tuple(expected[k][0])) for k in bad[:3]]}")
        if wrong:
            parts.append(f"dtype mismatch {[(k, sub[k][1], expected[k][1]) for k in wrong[:3]]}")
        raise DreamFlowError(f"state '{source}' does not match its settings ({'; '.join(parts)}); the file is damaged or edited")


def module_specs(build) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """name -> (shape, dtype name) of the state dict of the module ``build()`` makes, built on the meta
    device: no memory is allocated, whatever sizes the settings claim."""
    with torch.device("meta"):
        module = build()
    return {k: (tuple(v.shape), DTYPE_NAMES.get(v.dtype, str(v.dtype))) for k, v in module.state_dict().items()}


#: Largest workflow file read (ComfyUI's own are a few hundred kB).
MAX_JSON_BYTES = 64 << 20


def read_json_file(path: str, what: str = "file", fix: str = "re-save it") -> object:
    """The checked reader of user JSON files (workflows): a missing path, a folder, an unreadable or huge file,
    text that is not UTF-8 and invalid or too deeply nested JSON are one-line DreamFlowErrors."""
    path = as_path(path, what)
    if not os.path.exists(path):
        raise DreamFlowError(f"{what} '{path}' does not exist; check the path")
    if not os.path.isfile(path):
        raise DreamFlowError(f"{what} '{path}' is not a file (a folder?); give the path of a .json file")
    try:
        size = os.path.getsize(path)
        if size > MAX_JSON_BYTES:
            raise DreamFlowError(f"{what} '{path}' is {size >> 20} MiB, more than the {MAX_JSON_BYTES >> 20} MiB a "
                                 f"JSON file may have here; is it the right file?")
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DreamFlowError(f"cannot read {what} '{path}': {e.strerror or type(e).__name__}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DreamFlowError(f"{what} '{path}' is not UTF-8 text (byte {e.start} is 0x{raw[e.start]:02x}); is it the "
                             f"right file? {fix}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DreamFlowError(f"{what} '{path}' is not valid JSON (line {e.lineno}: {e.msg}); {fix}") from None
    except RecursionError:
        raise DreamFlowError(f"{what} '{path}' is nested too deeply to read; {fix}") from None


def read_json_object(path: str, what: str = "file", fix: str = "re-save it") -> dict:
    """:func:`read_json_file` that must hold a JSON object (configs, model indexes)."""
    data = read_json_file(path, what, fix)
    if not isinstance(data, dict):
        raise DreamFlowError(f"{what} '{path}' holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, else delete it.

    The temporary name carries this process's id (``.dreamflow-<pid>-XXXX<ext>.part``), so stale ones left by a
    killed process are recognised and removed by the next write into the folder (:func:`clean_stale_parts`). The
    file gets the usual mode of new files (0666 less the umask), not the temporary file's 0600.
    """
    directory = os.path.dirname(os.path.abspath(path)) or "."
    make_output_folder(directory)
    clean_stale_parts(directory)
    suffix = os.path.splitext(path)[1]
    with os_errors(path):
        fd, tmp = tempfile.mkstemp(prefix=f"{_PART_PREFIX}{os.getpid()}@{_host()}-", suffix=suffix + ".part",
                                   dir=directory)
        os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with os_errors(path):
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


_PART_PREFIX = ".dreamflow-"
_PART_NAME = re.compile(r"^\.dreamflow-(?:(\d+)(?:@([\w.-]*))?-)?.*\.part$")
#: A .part file older than this is stale even when its process id is alive again (reused ids).
STALE_PART_SECONDS = 24 * 3600
#: A .part file of a gone process is removed once it is this old (a grace for slow filesystems).
DEAD_PART_SECONDS = 60


def _host() -> str:
    """This machine's name as it goes into .part names (a shared folder may be written from several hosts:
    only this host's process ids are judged)."""
    import socket

    return re.sub(r"[^\w.-]", "_", socket.gethostname())[:64] or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale_parts(directory: str) -> List[str]:
    """Remove ``.dreamflow-<pid>@<host>-*.part`` files in ``directory`` whose writing process on this host is gone
    (and that are older than :data:`DEAD_PART_SECONDS`), and any older than :data:`STALE_PART_SECONDS` (an hour
    for names without a process id); returns the removed paths. Files of live writers, and of other hosts'
    writers younger than a day, are kept."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        m = _PART_NAME.match(name)
        if not m:
            continue
        path = os.path.join(directory, name)
        try:
            age = now - os.stat(path).st_mtime
            pid = int(m.group(1)) if m.group(1) else None
            here = m.group(2) is None or m.group(2) == _host()
            dead = pid is not None and here and pid != os.getpid() and not _pid_alive(pid)
            if age > STALE_PART_SECONDS or (dead and age > DEAD_PART_SECONDS) or (pid is None and age > 3600):
                os.remove(path)
                removed.append(path)
        except OSError:
            continue
    return removed


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


@contextmanager
def os_errors(path: str, doing: str = "write") -> Iterator[None]:
    """Turn the operating system's refusals while writing ``path`` into one-line DreamFlowErrors."""
    try:
        yield
    except OSError as e:
        if isinstance(e, DreamFlowError):
            raise
        why = {errno.ENAMETOOLONG: "its name is longer than the filesystem allows; use a shorter filename prefix",
               errno.ENOTDIR: "a part of its folder is a file, not a folder; remove that file or use another prefix",
               errno.EEXIST: "a file is in the way of its folder; remove it or use another prefix",
               errno.EACCES: "permission denied; choose an output folder you can write to",
               errno.EPERM: "permission denied; choose an output folder you can write to",
               errno.EROFS: "the filesystem is read-only; choose another output folder",
               errno.ENOSPC: "the disk is full; free space or choose another output folder",
               errno.EDQUOT: "the disk quota is exceeded; free space or choose another output folder",
               errno.EISDIR: "a folder has that name; use another prefix"}.get(e.errno, e.strerror or type(e).__name__)
        raise DreamFlowError(f"cannot {doing} '{path}': {why}") from None


def make_output_folder(folder: str) -> str:
    """Create ``folder`` (and parents); a file in the way or another refusal is a one-line DreamFlowError."""
    folder = os.path.abspath(folder)
    probe = folder
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.exists(probe) and not os.path.isdir(probe):
        raise DreamFlowError(f"cannot write into '{folder}': '{probe}' is a file, not a folder; remove or rename it, "
                             f"or choose another output folder / prefix")
    with os_errors(folder, "create the folder"):
        os.makedirs(folder, exist_ok=True)
    return folder


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
    (e.g. a NeRF state given where a mesh state is needed) or an unknown version. Callers that build
    modules from the header's sizes use :func:`inspect_state_file` and check before reading.
    """
    f = inspect_state_file(path, fmt, version)
    return f.tensors(), f.header


def load_module_tensors(module: torch.nn.Module, tensors: Dict[str, torch.Tensor], prefix: str, source: str) -> None:
    """Load ``prefix``-ed entries of ``tensors`` into ``module``; missing, mis-shaped or mis-typed tensors are
    a clear error."""
    own = {k: (tuple(v.shape), DTYPE_NAMES.get(v.dtype, str(v.dtype))) for k, v in module.state_dict().items()}
    check_tensor_specs(source, {k: (tuple(v.shape), DTYPE_NAMES.get(v.dtype, str(v.dtype))) for k, v in tensors.items()},
                       own, prefix)
    module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)


# --------------------------------------------------------------------------------------------
# Output paths
# --------------------------------------------------------------------------------------------
_SAFE_PART = re.compile(r"^[\w\-. ]+$")
#: Longest part of a prefix, in bytes: the final name adds ``_00001_`` and an extension or ``_turntable.png``
#: (most filesystems allow 255 bytes per name).
MAX_PREFIX_PART_BYTES = 200
PREFIX_RULE = ("a relative path of '/'-separated parts, each of letters, digits, '-', '_', '.' and spaces, starting "
               "with a letter, digit or '_' (not '.', which makes hidden files, nor '-'), not ending with '.' or a "
               "space, at most 200 bytes, and a file name after the last '/'")


def check_prefix(prefix: str) -> str:
    """Normalise and validate a filename prefix such as ``"dreamflow/corgi"``; returns the normal form.

    Normalised: surrounding spaces, ``\\`` -> ``/``, repeated ``/`` and ``./`` parts. Refused, with the rule
    (:data:`PREFIX_RULE`): empty, absolute, ``..``, other characters, a part starting with ``.`` or ``-`` or
    ending in ``.`` / a space, a trailing ``/`` (no file name), a part longer than
    :data:`MAX_PREFIX_PART_BYTES` bytes.
    """
    if not isinstance(prefix, str):
        raise DreamFlowError(f"filename prefix {prefix!r} is not text; give one such as 'dreamflow/object'")
    raw = prefix
    p = prefix.strip().replace("\\", "/")
    if not p:
        raise DreamFlowError("filename prefix is empty; give one such as 'dreamflow/object'")
    if os.path.isabs(p) or p.startswith("/") or re.match(r"^[A-Za-z]:", p):
        raise DreamFlowError(f"filename prefix '{raw}' is an absolute path; give a path relative to the output folder")
    parts = p.split("/")
    if any(part.strip() == ".." for part in parts):
        raise DreamFlowError(f"filename prefix '{raw}' contains '..'; outputs must stay inside the output folder")
    if parts[-1].strip() == "" and len(parts) > 1:
        raise DreamFlowError(f"filename prefix '{raw}' ends with '/' and so names no file; add a name after the "
                             f"folder, e.g. '{p.rstrip('/')}/object'")
    parts = [part.strip() for part in parts if part.strip() not in ("", ".")]
    if not parts:
        raise DreamFlowError(f"filename prefix '{raw}' names no file; the rule: {PREFIX_RULE}")
    for part in parts:
        if not _SAFE_PART.match(part):
            bad = "".join(sorted({c for c in part if not re.match(r"[\w\-. ]", c)}))
            raise DreamFlowError(f"filename prefix '{raw}' has characters other than letters, digits, '-', '_', '.', "
                                 f"' ', '/' ({bad!r}); the rule: {PREFIX_RULE}")
        if part[0] in ".-" or part[-1] in ". ":
            raise DreamFlowError(f"filename prefix '{raw}' has the part '{part}', which starts with '.' or '-' or ends "
                                 f"with '.' or a space; the rule: {PREFIX_RULE}")
        if len(part.encode("utf-8")) > MAX_PREFIX_PART_BYTES:
            raise DreamFlowError(f"filename prefix '{raw[:40]}...' has a part of {len(part.encode('utf-8'))} bytes, "
                                 f"longer than the {MAX_PREFIX_PART_BYTES} a file name may use here; shorten it")
    return "/".join(parts)


def _output_root(output_dir: str | None) -> str:
    from . import hosting

    fp = hosting.folder_paths()
    if fp is not None and output_dir is None:
        return os.path.abspath(fp.get_output_directory())
    return os.path.abspath(output_dir or hosting.output_directory())


def check_output_target(prefix: str, output_dir: str | None = None) -> str:
    """Everything a save with ``prefix`` will need, checked without writing (a node's ``VALIDATE_INPUTS``):
    the prefix rule, the folder inside the output folder, and no file in the way of its folders. Returns the
    normalised prefix."""
    prefix = check_prefix(prefix)
    out = _output_root(output_dir)
    folder = os.path.abspath(os.path.join(out, os.path.dirname(prefix)))
    if os.path.commonpath([out, folder]) != out:
        raise DreamFlowError(f"filename prefix '{prefix}' leaves the output folder")
    probe = folder
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise DreamFlowError(f"cannot write into '{folder}': '{probe}' is a file, not a folder; remove or rename it, "
                             f"or choose another output folder / prefix")
    return prefix


def next_output_path(prefix: str, ext: str, output_dir: str | None = None) -> Tuple[str, str]:
    """Claim a new ``<prefix>_00001_.<ext>``: return ``(absolute_path, path_relative_to_output_dir)``.

    The name is claimed atomically (exclusive create of an empty file): two saves at once, from two ComfyUI
    queues or two headless runs into one folder, get different numbers (the next free one on a clash). The
    caller writes the file with :func:`atomic_path` (which replaces the empty claim) or removes the claim if it
    fails (:func:`claimed_output` does both). Hosted, ComfyUI's ``folder_paths.get_save_image_path`` gives the
    first number to try; headless, the same rule and counter are applied here.
    """
    prefix = check_prefix(prefix)
    ext = ext.lstrip(".")
    out = _output_root(output_dir)
    subfolder, filename = os.path.split(prefix)
    full_folder = os.path.abspath(os.path.join(out, subfolder))
    if os.path.commonpath([out, full_folder]) != out:
        raise DreamFlowError(f"filename prefix '{prefix}' leaves the output folder")
    make_output_folder(full_folder)
    clean_stale_parts(full_folder)
    pat = re.compile(re.escape(filename) + r"_(\d+)_")
    with os_errors(os.path.join(full_folder, filename), "list the folder of"):
        nums = [int(m.group(1)) for n in os.listdir(full_folder) if (m := pat.match(n))]
    counter = max(nums, default=0) + 1
    for _ in range(10_000):
        full = os.path.join(full_folder, f"{filename}_{counter:05}_.{ext}")
        try:
            os.close(os.open(full, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            counter += 1
            continue
        except OSError:
            with os_errors(full):
                raise
        rel = os.path.relpath(full, out).replace(os.sep, "/")
        return full, rel
    raise DreamFlowError(f"no free name for '{prefix}' in {full_folder} after 10000 tries; use another prefix")


@contextmanager
def claimed_output(prefix: str, ext: str, output_dir: str | None = None) -> Iterator[Tuple[str, str]]:
    """:func:`next_output_path` for one write: yields ``(full, rel)``; if the body fails, the claim is removed
    (an empty claim is never left behind under the final name)."""
    full, rel = next_output_path(prefix, ext, output_dir)
    try:
        yield full, rel
    except BaseException:
        try:
            if os.path.getsize(full) == 0:
                os.remove(full)
        except OSError:
            pass
        raise
