"""DreamFlow engine: text-to-3D by approximate probability flow (Lee, Sohn & Shin, ICLR 2024).

Importable without ComfyUI. Map of the package:

* ``denoisers/``  load SD 1.x/2.x and the SDXL refiner (``Denoiser``), the scene LoRA (``SceneDenoiser``).
* ``guidance/``   one interface, three methods: ``apfo`` (DreamFlow), ``sds``, ``vsd``; the timestep schedule.
* ``scene/``      what is optimised: hash grid + NeRF field, textured mesh.
* ``render/``     cameras, volume renderer, rasterizer (nvdiffrast or pure torch), shading, backend choice.
* ``stages/``     NeRFStage, ExtractMesh, MeshStage, SDXLRefine and the shared optimisation loop.
* ``export/``     UV atlas, texture bake, GLB writer, turntable renders.
* ``state.py``    ``NeRFState`` / ``MeshState``: typed results with safetensors save / load.
* ``runner/``     headless workflow runner (``python -m dreamflow run WORKFLOW.json``).
"""

__version__ = "0.1.0"
