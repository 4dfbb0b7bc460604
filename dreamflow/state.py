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
from typing import Dict, List, Optional

import torch

from . import config as cfgio
from .errors import DreamFlowError, check
from .io import load_module_tensors, load_state_file, save_state_file
from .scene.nerf import Background, BackgroundConfig, NeRFField, NeRFFieldConfig

NERF_FORMAT, MESH_FORMAT, VERSION = "dreamflow.nerf", "dreamflow.mesh", 1


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
    def _rebuild(tensors, header, path):
        try:
            fcfg = cfgio.from_dict(NeRFFieldConfig, header.get("field_config"), "field_config")
            bcfg = cfgio.from_dict(BackgroundConfig, header.get("background_config"), "background_config")
        except (TypeError, DreamFlowError) as e:
            raise DreamFlowError(f"state '{path}' has settings this DreamFlow cannot read ({e}); re-create it") from None
        field_ = NeRFField(fcfg)
        bg = Background(bcfg)
        load_module_tensors(field_, tensors, "field.", path)
        load_module_tensors(bg, tensors, "background.", path)
        lora = {k[5:]: v for k, v in tensors.items() if k.startswith("lora.")}
        common = dict(field=field_, background=bg, prompt=str(header.get("prompt", "")),
                      negative_prompt=str(header.get("negative_prompt", "")), settings=header.get("settings") or {},
                      guidance_log=list(header.get("guidance_log") or []), history=list(header.get("history") or []),
                      lora=lora)
        return common

    def clone(self):
        return copy.deepcopy(self)


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
        tensors, header = load_state_file(path, NERF_FORMAT, VERSION)
        state = cls(**cls._rebuild(tensors, header, path))
        return state.to(device)

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
        tensors, header = load_state_file(path, MESH_FORMAT, VERSION)
        for key in ("vertices", "faces"):
            if key not in tensors:
                raise DreamFlowError(f"mesh state '{path}' has no '{key}' tensor; the file is damaged")
        v, f = tensors["vertices"], tensors["faces"]
        if v.dim() != 2 or v.shape[1] != 3 or f.dim() != 2 or f.shape[1] != 3 or \
                (f.numel() and (int(f.max()) >= v.shape[0] or int(f.min()) < 0)):
            raise DreamFlowError(f"mesh state '{path}' has inconsistent vertices {tuple(v.shape)} / faces {tuple(f.shape)}")
        state = cls(**cls._rebuild(tensors, header, path), vertices=v.float(), faces=f.long())
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
    from .io import read_state_header

    header = read_state_header(path)
    if header is not None and header.get("format") == MESH_FORMAT:
        return MeshState.load(path, device)
    return NeRFState.load(path, device)  # also explains every other case (pickle, missing, foreign)
