"""DreamFlow engine: text-to-3D by approximate probability flow (Lee, Sohn & Shin, ICLR 2024).

Importable without ComfyUI. Map of the package:

* ``denoisers/``  load SD 1.x/2.x and the SDXL refiner (``Denoiser``), the scene LoRA (``SceneDenoiser``).
* ``guidance/``   one interface, three methods: ``apfo`` (DreamFlow), ``sds``, ``vsd``; the timestep schedule.
* ``scene/``      what is optimised: hash grid + NeRF field, textured mesh.
* ``render/``     cameras, volume renderer, rasterizer (nvdiffrast or pure torch), shading.
* ``stages/``     NeRFStage, ExtractMesh, MeshStage, SDXLRefine and the shared optimisation loop.
* ``export/``     UV atlas, texture bake, GLB writer, turntable renders.
* ``state.py``    ``NeRFState`` / ``MeshState``: typed results with safetensors save / load.
* ``runner/``     headless workflow runner (``python -m dreamflow run WORKFLOW.json``).
* ``backends.py`` the one picker of native extensions (nvdiffrast, tiny-cuda-nn) for rasterizer and hash grid.

Floors (tests/test_layering.py keeps them): errors, io, hosting, backends, ... at the ground; then scene and
denoisers; render and guidance; export and toy; state; stages; then the adapters (nodes/), the runner and the
demo. An import never climbs a floor.
"""

__version__ = "0.1.0"
