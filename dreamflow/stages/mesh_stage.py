"""Mesh stages: ExtractMesh (NeRF -> mesh), MeshStage (stage 2) and SDXLRefine (stage 3).

* ``extract_mesh_state(nerf_state, ExtractConfig)`` -> MeshState (colour field = the NeRF's albedo).
* ``run_mesh_stage(denoiser, mesh_state, prompt=None, ...)``: bounded vertex offsets + colour field at
  512 px, APFO t 0.5 -> 0.1 (paper stage 2), normal-consistency and Laplacian regularisers.
* ``run_refine_stage(refiner, mesh_state, prompt=None, ...)``: the same loop with the SDXL refiner at
  1024 px, t 0.3 -> 0.0, colour only by default (paper stage 3).

Both take the prompts the mesh state carries (typed once, in the NeRF stage); a prompt given here overrides them and
is logged (:func:`state_prompts`). A scene LoRA the state carries continues when the state comes from the same stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from .. import config as cfgio
from ..errors import check, explain_memory
from ..guidance import GuidanceConfig
from ..hosting import Callbacks
from ..render.shading import ShadingConfig, pick_mode, random_light
from ..scene.mesh import MeshModel, MeshModelConfig
from ..state import MeshState, NeRFState, require_state
from .extract import ExtractConfig, extract_mesh
from ..seeding import SEED_HOST_CHOICES, SEED_RENDER, derived_seed
from .common import StageConfig, fit_views
from .loop import autograd_on, optimise
from .nerf_stage import check_common, check_denoiser, check_prompt

log = logging.getLogger("dreamflow")


def extract_mesh_state(nerf: NeRFState, config: Optional[ExtractConfig] = None) -> MeshState:
    """Marching cubes on the NeRF density -> MeshState whose colour field starts as the NeRF's albedo."""
    require_state(nerf, NeRFState, "ExtractMesh", "connect a NeRF stage's or Load State's 'nerf' output")
    config = (config or ExtractConfig()).validate()
    field_ = nerf.field
    with explain_memory("ExtractMesh", f"resolution (now {config.resolution})"):
        v, f = extract_mesh(field_.density, config, radius=field_.config.radius, device=nerf.device)
    copy = nerf.clone()
    return MeshState(field=copy.field.eval(), background=copy.background.eval(), prompt=nerf.prompt,
                     negative_prompt=nerf.negative_prompt, settings=cfgio.to_dict(config),
                     guidance_log=list(nerf.guidance_log), history=list(nerf.history) + ["ExtractMesh"],
                     vertices=torch.as_tensor(v, dtype=torch.float32, device=nerf.device),
                     faces=torch.as_tensor(f, dtype=torch.long, device=nerf.device))


@dataclass
class MeshStageConfig(StageConfig):
    """Stage 2 settings. Defaults: paper (512 px, t 0.5 -> 0.1) and threestudio prolificdreamer-geometry.yaml; the
    common part is :class:`~dreamflow.stages.common.StageConfig` (redeclared here where stage 2's default differs)."""

    iterations: int = 1500
    """Updates. 1,500 x 4 views = 6,000 view-updates, the reference workload of bench/ (ours)."""
    resolution: int = 512
    """Render size, px (paper stage 2)."""
    guidance: GuidanceConfig = field(default_factory=lambda: GuidanceConfig(method="apfo", t_start=0.5, t_end=0.1))
    """APFO t 0.5 -> 0.1 (paper stage 2)."""
    optimize_geometry: bool = True
    """Optimise vertex offsets (stage 2: geometry + texture). Off (texture only, MeshStage's ``texture_only``): the
    vertices come out bit-identical to the input's, e.g. to texture a mesh made elsewhere without changing it."""
    optimize_color: bool = True
    """Optimise the colour field."""
    lr_geometry: float = 5e-3
    """Adam lr of the raw vertex offsets (threestudio prolificdreamer-geometry lr 0.005)."""
    lambda_normal_consistency: float = 1e4
    """Weight of 1 - cos between adjacent face normals (threestudio prolificdreamer-geometry: 10000)."""
    lambda_laplacian: float = 1e4
    """Weight of the uniform-Laplacian smoothness of the displacement (threestudio: 10000)."""
    mesh: MeshModelConfig = field(default_factory=MeshModelConfig)
    """Vertex offsets bounded by max_offset (0.05 world units) through tanh."""
    shading: ShadingConfig = field(default_factory=lambda: ShadingConfig(ambient_only_steps=0))
    """Lambertian / textureless / albedo mix from the first update (the geometry exists already)."""
    backend: str = "auto"
    """Rasterizer: "auto" (nvdiffrast on CUDA when installed, else torch), "cuda" or "torch"."""

    def validate(self) -> "MeshStageConfig":
        check_common(self, "SDXLRefine" if isinstance(self, RefineConfig) else "MeshStage")
        check(self.optimize_geometry or self.optimize_color, "mesh stage: nothing to optimise; enable optimize_geometry or optimize_color")
        check(self.lambda_normal_consistency >= 0 and self.lambda_laplacian >= 0, "mesh stage: regulariser weights must be >= 0")
        check(self.backend in ("auto", "cuda", "torch"), f"rasterizer backend '{self.backend}' is unknown; use auto, cuda or torch")
        self.mesh.validate()
        self.shading.validate()
        return self


#: Side of the live preview image of the mesh stages, pixels (ComfyUI shows previews at up to 512 px).
PREVIEW_RESOLUTION = 256


@dataclass
class RefineConfig(MeshStageConfig):
    """Stage 3 settings (SDXL refiner). Defaults: paper (1024 px, t 0.3 -> 0.0), colour only."""

    iterations: int = 1000
    """Updates. 1,000 x 2 views = 2,000 view-updates, the reference workload of bench/ (ours)."""
    views_per_update: int = 2
    """Random views per update (ours; 1024 px renders are 4x the pixels of stage 2)."""
    resolution: int = 1024
    """Render size, px (paper stage 3)."""
    denoise_resolution: int = 1024
    """SDXL refiner native size."""
    guidance: GuidanceConfig = field(default_factory=lambda: GuidanceConfig(method="apfo", t_start=0.3, t_end=0.0))
    """APFO t 0.3 -> 0.0 (paper stage 3)."""
    optimize_geometry: bool = False
    """Stage 3 refines colour only by default (paper); enable to also move vertices."""


@autograd_on
def _run_mesh_like(stage: str, kind: str, denoiser, mesh: MeshState, prompt: Optional[str],
                   negative_prompt: Optional[str],
                   config: MeshStageConfig, callbacks: Optional[Callbacks]) -> MeshState:
    from ..render.mesh_render import render_mesh, render_turntable
    from ..render.raster import antialias_topology

    config = config.validate()
    require_state(mesh, MeshState, stage, "connect ExtractMesh, a mesh stage or Load State's 'mesh' output "
                                         "(a NeRF must go through ExtractMesh first)")
    prompt, negative_prompt = state_prompts(mesh, prompt, negative_prompt, stage)
    check_denoiser(denoiser, kind, config, stage)
    config = fit_views(config, denoiser, stage)
    # The scene LoRA the state carries continues when the state comes from this very stage (a mesh stage after a
    # mesh stage, as a NeRF stage continues its init's); after ExtractMesh or another stage there is none to use.
    carried = mesh.lora if mesh.lora and mesh.history and mesh.history[-1] == stage else None
    device = denoiser.device
    start = mesh.clone().to(device)
    model = MeshModel(start.vertices, start.faces, start.field, config.mesh).to(device)
    background = start.background.train()
    model.train()
    groups = model.param_groups(config.lr_geometry, config.lr_grid, config.lr_mlp)
    groups = [g for g in groups if (g["name"] == "geometry" and config.optimize_geometry)
              or (g["name"] != "geometry" and config.optimize_color)]
    for p in model.parameters():
        p.requires_grad_(False)
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    groups += background.param_groups(config.lr_background) if config.optimize_color else []
    for p in background.parameters():
        p.requires_grad_(config.optimize_color)
    optimizer = torch.optim.Adam(groups, betas=tuple(config.betas), eps=config.adam_eps)
    gen = torch.Generator().manual_seed(derived_seed(config.seed, SEED_HOST_CHOICES))  # shading mode, light
    # On CUDA the background's random solid colours are drawn on the device: a CPU draw would be copied over
    # with a stream sync at every update. On the CPU there is no sync to save, and sharing ``gen`` keeps CPU
    # runs drawing exactly what they drew before.
    render_gen = gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(
        derived_seed(config.seed, SEED_RENDER))
    faces32 = model.faces.int()
    topology = antialias_topology(faces32, config.backend)

    # The deformed geometry is computed once per update and shared by the render and both regularisers;
    # with frozen offsets (stage 3's default) it never changes, so once per stage.
    frozen = None
    if not config.optimize_geometry:
        with torch.no_grad():
            frozen = model.deform()

    def render_fn(cams, step):
        mode = pick_mode(config.shading, step, gen)
        lights = random_light(cams, gen, config.shading) if mode != "albedo" else None
        geo = frozen if frozen is not None else model.deform()
        out = render_mesh(geo.vertices, faces32, model.albedo, cams,
                          background=lambda d: background(d, generator=render_gen), light_positions=lights, shading=mode,
                          shading_config=config.shading, backend=config.backend, topology=topology,
                          normals=geo.vertex_normals)
        reg = torch.zeros((), device=device)
        if config.optimize_geometry:
            reg = reg + config.lambda_normal_consistency * model.normal_consistency_loss(geo) \
                + config.lambda_laplacian * model.laplacian_loss(geo)
        return out["rgb"], reg

    settings = cfgio.to_dict(config)
    history = list(mesh.history) + [stage]

    def snapshot(log):
        # texture only: the input's vertices bit for bit (base + 0 would turn -0.0 into +0.0)
        vertices = start.vertices.detach().float().clone() if not config.optimize_geometry else \
            model.vertices().detach().clone()
        return MeshState(field=model.color, background=background, prompt=prompt, negative_prompt=negative_prompt,
                         settings=settings, guidance_log=list(mesh.guidance_log) + [dict(r, stage=stage) for r in log],
                         history=history, vertices=vertices, faces=model.faces.clone())

    def preview_fn():
        # What the user gets (the stage's turntable output and SaveGLB's look): the coloured mesh, unlit, on white,
        # from the front; not the training render (random shading mode, light and background).
        geo = frozen if frozen is not None else model.deform()
        return render_turntable(geo.vertices, faces32, model.albedo, n_views=1, resolution=PREVIEW_RESOLUTION,
                                backend=config.backend)[0]

    result = optimise(stage=stage, denoiser=denoiser, prompt=prompt, negative_prompt=negative_prompt, config=config,
                      render_fn=render_fn, optimizer=optimizer, snapshot=snapshot, callbacks=callbacks,
                      guidance_state=carried, preview_fn=preview_fn)
    for p in list(model.parameters()) + list(background.parameters()):
        p.requires_grad_(True)
    model.eval()
    background.eval()
    state = snapshot(result.log)
    state.lora = result.guidance_state
    return state


def state_prompts(state, prompt: Optional[str], negative_prompt: Optional[str], stage: str) -> Tuple[str, str]:
    """The prompts a stage continuing ``state`` uses: the state's own (typed once, in the NeRF stage, and carried
    by every state since), unless ``prompt`` / ``negative_prompt`` override them (None or blank = the state's).
    An override that differs from the state's is logged, so a mismatch is never silent."""
    def pick(given: Optional[str], carried: str, what: str) -> str:
        if given is None or not given.strip():
            return carried
        if carried and given.strip() != carried.strip():
            log.warning("dreamflow: %s: %s override %r replaces the state's %r", stage, what, given.strip(), carried)
        return given

    prompt = check_prompt(pick(prompt, state.prompt, "prompt"), stage)
    return prompt, pick(negative_prompt, state.negative_prompt, "negative prompt")


def run_mesh_stage(denoiser, mesh: MeshState, prompt: Optional[str] = None, negative_prompt: Optional[str] = None,
                   config: Optional[MeshStageConfig] = None, callbacks: Optional[Callbacks] = None) -> MeshState:
    """Stage 2: refine geometry (bounded offsets) and colour of ``mesh`` with an SD denoiser at 512 px.
    ``prompt`` / ``negative_prompt``: None (or blank) = the mesh state's own; text overrides them (logged)."""
    return _run_mesh_like("MeshStage", "sd", denoiser, mesh, prompt, negative_prompt, config or MeshStageConfig(), callbacks)


def run_refine_stage(refiner, mesh: MeshState, prompt: Optional[str] = None, negative_prompt: Optional[str] = None,
                     config: Optional[RefineConfig] = None, callbacks: Optional[Callbacks] = None) -> MeshState:
    """Stage 3: refine colour (and optionally geometry) of ``mesh`` with the SDXL refiner at 1024 px.
    ``prompt`` / ``negative_prompt``: None (or blank) = the mesh state's own; text overrides them (logged)."""
    return _run_mesh_like("SDXLRefine", "sdxl_refiner", refiner, mesh, prompt, negative_prompt, config or RefineConfig(), callbacks)
