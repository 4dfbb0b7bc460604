"""Typed results of the stages, with safe save / load (safetensors + JSON header, no pickle).

* :class:`NeRFState`: stage-1 result (NeRF field + background) -> ExtractMesh, or resume.
* :class:`MeshState`: ExtractMesh / MeshStage / SDXLRefine result (triangle mesh + colour field +
  background) -> the next mesh stage, SaveGLB.

File layout: tensors ``field.*`` / ``background.*`` / ``lora.*`` (+ ``vertices``, ``faces`` for meshes);
header ``{"format", "version", "field_config", "background_config", "settings", "prompt",
"negative_prompt", "guidance_log", "history"}``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import config as cfgio
from .errors import DreamFlowError, check
from .io import (StateFile, check_tensor_specs, inspect_state_file, load_module_tensors, module_specs,
                 save_state_file)
from .scene.nerf import Background, BackgroundConfig, NeRFField, NeRFFieldConfig

NERF_FORMAT, MESH_FORMAT, VERSION = "dreamflow.nerf", "dreamflow.mesh", 1
#: Most vertices / faces a mesh state may hold (ExtractMesh's face budget allows 10 million).
MAX_MESH_ELEMENTS = 50_000_000


def _mesh_specs(sf: StateFile) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """The expected specs of a mesh state's ``vertices`` [N, 3] float32 and ``faces`` [F, 3] int64."""
    path = sf.path
    for key in ("vertices", "faces"):
        if key not in sf.specs:
            raise DreamFlowError(f"mesh state '{path}' has no '{key}' tensor; the file is damaged")
    (vs, _), (fs, _) = sf.specs["vertices"], sf.specs["faces"]
    if len(vs) != 2 or vs[1] != 3 or len(fs) != 2 or fs[1] != 3 or vs[0] > MAX_MESH_ELEMENTS or fs[0] > MAX_MESH_ELEMENTS \
            or vs[0] < 3 or fs[0] < 1:
        raise DreamFlowError(f"mesh state '{path}' has vertices {vs} / faces {fs}; want [N, 3] and [F, 3] with 3 <= N and "
                             f"1 <= F, at most {MAX_MESH_ELEMENTS} rows; the file is damaged")
    return {"vertices": (vs, "F32"), "faces": (fs, "I64")}


def check_state_file(path: str) -> str:
    """Every check :func:`load_state` makes before reading tensors (header, settings, shapes, dtypes), without
    reading them: for Load State's ``VALIDATE_INPUTS``. Returns the state's format."""
    sf = inspect_state_file(path, None, VERSION)
    fmt = sf.header.get("format")
    if fmt not in (NERF_FORMAT, MESH_FORMAT):
        raise DreamFlowError(f"'{path}' holds a {fmt!r} state, not a DreamFlow NeRF or mesh state; pick another file")
    _check(sf, _mesh_specs(sf) if fmt == MESH_FORMAT else None)
    return fmt


def _object(header: dict, key: str, path: str) -> dict:
    value = header.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DreamFlowError(f"header field '{key}' is a {type(value).__name__}, not an object")
    return value


def _header_fields(header: dict, path: str) -> Dict[str, Any]:
    """The header's plain fields, each checked for its type (one-line DreamFlowError otherwise)."""
    want = {"prompt": (str, ""), "negative_prompt": (str, ""), "settings": (dict, {}), "guidance_log": (list, []),
            "history": (list, [])}
    out = {}
    for key, (typ, default) in want.items():
        value = header.get(key)
        if value is None:
            value = copy.deepcopy(default)
        if not isinstance(value, typ):
            raise DreamFlowError(f"state '{path}' has a header field '{key}' that is a {type(value).__name__}, not a "
                                 f"{typ.__name__}; the file is damaged or edited: re-save it")
        out[key] = value
    if not all(isinstance(r, dict) for r in out["guidance_log"]):
        raise DreamFlowError(f"state '{path}' has a guidance_log whose rows are not objects; the file is damaged or edited")
    if not all(isinstance(h, str) for h in out["history"]):
        raise DreamFlowError(f"state '{path}' has a history that is not a list of stage names; the file is damaged or edited")
    return out


def _module_tensors(prefix: str, module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in module.state_dict().items()}


@dataclass
class _SceneState:
    field: NeRFField
    """Stage 1: the NeRF; mesh states: the colour field (only ``albedo`` is used)."""
    background: Background
    prompt: str
    negative_prompt: str = ""
    settings: Dict = field(default_factory=dict)
    """The last stage's config as a dict (``dreamflow.config.to_dict``)."""
    guidance_log: List[Dict] = field(default_factory=list)
    """One row per update of every stage so far: stage, step, t, sigma, grad_norm, loss, ..."""
    history: List[str] = field(default_factory=list)
    """Stages applied so far, e.g. ["NeRFStage", "ExtractMesh", "MeshStage"]."""
    lora: Dict[str, torch.Tensor] = field(default_factory=dict)
    """The scene LoRA of the last stage (to resume APFO / VSD), may be empty."""

    FORMAT = ""

    @property
    def device(self) -> torch.device:
        return next(self.field.parameters()).device

    def _header(self) -> dict:
        return {"format": self.FORMAT, "version": VERSION,
                "field_config": cfgio.to_dict(self.field.config),
                "background_config": cfgio.to_dict(self.background.config),
                "settings": self.settings, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
                "guidance_log": self.guidance_log, "history": self.history}

    def _tensors(self) -> Dict[str, torch.Tensor]:
        t = _module_tensors("field.", self.field)
        t.update(_module_tensors("background.", self.background))
        t.update({"lora." + k: v for k, v in self.lora.items()})
        return t

    @staticmethod
    def _rebuild(sf: StateFile, extra: Optional[Dict[str, Tuple[Tuple[int, ...], str]]] = None) -> tuple:
        """Check a state file against its own settings (:func:`_check`), then build its modules from it."""
        fcfg, bcfg, fields = _check(sf, extra)
        path = sf.path
        tensors = sf.tensors()
        bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
        check(not bad, f"state '{path}' has non-finite values (NaN or infinity) in {bad[:3]}; the file is damaged or "
                       f"was saved from a diverged run: re-create it")
        field_ = NeRFField(fcfg)
        bg = Background(bcfg)
        load_module_tensors(field_, tensors, "field.", path)
        load_module_tensors(bg, tensors, "background.", path)
        lora = {k[5:]: v for k, v in tensors.items() if k.startswith("lora.")}
        return dict(field=field_, background=bg, lora=lora, **fields), tensors

    def clone(self):
        return copy.deepcopy(self)


def _check(sf: StateFile, extra: Optional[Dict[str, Tuple[Tuple[int, ...], str]]] = None):
    """The checks of a state file before anything of the size it claims is allocated (the one checked path).

    The header's fields have their types, the settings are valid, and every tensor has exactly the shape and
    dtype those settings imply (the modules are built on the meta device to know them), plus ``extra``
    (name -> (shape, dtype)) for the rest. Returns (field config, background config, header fields).
    """
    path, header = sf.path, sf.header
    fields = _header_fields(header, path)
    try:
        fcfg = cfgio.from_dict(NeRFFieldConfig, _object(header, "field_config", path), "field_config").validate()
        bcfg = cfgio.from_dict(BackgroundConfig, _object(header, "background_config", path), "background_config")
        specs = {"field." + k: v for k, v in module_specs(lambda: NeRFField(fcfg)).items()}
        specs.update({"background." + k: v for k, v in module_specs(lambda: Background(bcfg)).items()})
    except DreamFlowError as e:
        raise DreamFlowError(f"state '{path}' has settings this DreamFlow cannot read ({e}); re-create it") from None
    except (TypeError, ValueError, OverflowError, RuntimeError, MemoryError) as e:
        raise DreamFlowError(f"state '{path}' has settings this DreamFlow cannot read ({type(e).__name__}); "
                             f"re-create it") from None
    specs.update(extra or {})
    lora_specs = {k: v for k, v in sf.specs.items() if k.startswith("lora.")}
    bad = sorted(k for k, (_, dt) in lora_specs.items() if dt not in ("F32", "F16", "BF16"))
    check(not bad, f"state '{path}' has LoRA tensors {bad[:3]} that are not floating point; the file is damaged or edited")
    specs.update(lora_specs)
    check_tensor_specs(path, sf.specs, specs)
    return fcfg, bcfg, fields


@dataclass
class NeRFState(_SceneState):
    """Result of NeRFStage: ``field`` (density + albedo) and ``background``."""

    FORMAT = NERF_FORMAT

    def save(self, path: str) -> str:
        """Write ``path`` (.safetensors) atomically."""
        return save_state_file(path, self._tensors(), self._header())

    @classmethod
    def load(cls, path: str, device="cpu") -> "NeRFState":
        """Read a state written by :meth:`save`; refuses pickles, other formats and versions."""
        kwargs, _ = cls._rebuild(inspect_state_file(path, NERF_FORMAT, VERSION))
        return cls(**kwargs).to(device)

    def to(self, device) -> "NeRFState":
        self.field.to(device)
        self.background.to(device)
        return self

    @torch.no_grad()
    def turntable(self, n_views: int = 8, resolution: int = 256, elevation: float = 15.0,
                  background=(1.0, 1.0, 1.0)) -> torch.Tensor:
        """[n, H, W, 3] float images in [0, 1] around the object (volume renderer, albedo, white background)."""
        from .render.cameras import orbit_cameras
        from .render.volume import VolumeRenderConfig, render_volume

        cams = orbit_cameras(n_views, resolution, elevation=elevation).to(self.device)
        was = self.field.training
        self.field.eval()
        out = [render_volume(self.field, background, cams.subset(i),
                             VolumeRenderConfig(stratified=False))["rgb"] for i in range(n_views)]
        self.field.train(was)
        return torch.cat(out).clamp(0, 1).cpu()


@dataclass
class MeshState(_SceneState):
    """Result of ExtractMesh / MeshStage / SDXLRefine.

    Attributes (besides the shared ones):
        vertices: [N, 3] float32 world positions (+Y up, front +Z).
        faces: [F, 3] int64, counter-clockwise seen from outside.
    """

    vertices: Optional[torch.Tensor] = None
    faces: Optional[torch.Tensor] = None

    FORMAT = MESH_FORMAT

    def __post_init__(self):
        check(self.vertices is not None and self.faces is not None, "MeshState needs vertices and faces")

    def save(self, path: str) -> str:
        t = self._tensors()
        t["vertices"] = self.vertices.float()
        t["faces"] = self.faces.long()
        return save_state_file(path, t, self._header())

    @classmethod
    def load(cls, path: str, device="cpu") -> "MeshState":
        sf = inspect_state_file(path, MESH_FORMAT, VERSION)
        kwargs, tensors = cls._rebuild(sf, _mesh_specs(sf))
        v, f = tensors["vertices"], tensors["faces"]
        if f.numel() and (int(f.max()) >= v.shape[0] or int(f.min()) < 0):
            raise DreamFlowError(f"mesh state '{path}' has faces indexing vertices outside 0..{v.shape[0] - 1}; the file is damaged")
        state = cls(**kwargs, vertices=v, faces=f)
        return state.to(device)

    def to(self, device) -> "MeshState":
        self.field.to(device)
        self.background.to(device)
        self.vertices = self.vertices.to(device)
        self.faces = self.faces.to(device)
        return self

    def color_fn(self):
        """Callable points [P, 3] -> albedo [P, 3] in [0, 1] (no grad)."""
        field_ = self.field

        def fn(points):
            with torch.no_grad():
                return field_.albedo(points.to(next(field_.parameters()).device)).float()

        return fn

    @torch.no_grad()
    def turntable(self, n_views: int = 8, resolution: int = 256, elevation: float = 15.0,
                  background=(1.0, 1.0, 1.0)) -> torch.Tensor:
        """[n, H, W, 3] float images in [0, 1] around the mesh (rasterized, albedo, white background)."""
        from .render.mesh_render import render_turntable

        return render_turntable(self.vertices, self.faces.int(), self.color_fn(), n_views=n_views,
                                resolution=resolution, elevation=elevation, background=background).clamp(0, 1).cpu()

    def export_glb(self, path: str, config=None) -> str:
        """Write a textured GLB (UV atlas + baked colour field) atomically; returns ``path``."""
        from .export import ExportConfig, export_glb

        # vertices stay on their device: the UV bake then rasterizes there (nvdiffrast on CUDA)
        return export_glb(self.vertices.detach().float(), self.faces.detach().long(), self.color_fn(),
                          path, config or ExportConfig())


class NoState:
    """What Load State's other output carries: the file holds the other kind of state.

    Using it anywhere a state is needed raises its message (one line, naming the right output), where a
    plain ``None`` would silently mean "not connected" (e.g. a NeRF stage would start from scratch).
    """

    def __init__(self, message: str):
        self.message = message

    def __repr__(self) -> str:
        return f"NoState({self.message!r})"


def require_state(value, cls, where: str, fix: str):
    """``value`` if it is a ``cls`` state, else a one-line DreamFlowError (NoState: its own message)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, NoState):
        raise DreamFlowError(f"{where}: {value.message}")
    noun = {"NeRFState": "NeRF state", "MeshState": "mesh state"}.get(cls.__name__, cls.__name__)
    got = "nothing" if value is None else f"a {type(value).__name__}"
    raise DreamFlowError(f"{where} needs a {noun} ({cls.__name__}) but got {got}; {fix}")


def load_state(path: str, device="cpu"):
    """Load a NeRF or mesh state by its header's format (for the Load State node); one read of the file."""
    from .io import as_path, read_state_header

    path = as_path(path, "state file")
    header = read_state_header(path)
    if isinstance(header, dict) and header.get("format") == MESH_FORMAT:
        return MeshState.load(path, device)
    return NeRFState.load(path, device)  # also explains every other case (pickle, missing, foreign)
