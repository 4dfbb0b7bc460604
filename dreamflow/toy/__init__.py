"""The toy world and its shipped prior ``models/dreamflow-toy`` (an offline default and a quality benchmark).

* ``world``: 7 shapes x 6 colours as meshes, rendered by ``render/mesh_render.py`` from the stages' cameras;
  captions with view words; prompt parsing.
* ``prior``: the prior's diffusers layout (a small Stable Diffusion, 64 px) and weight installation.
* ``demo_settings``: the offline demo's settings and their one mapping to the toy workflow's widgets.
* ``classifier``: the shape x colour judge of ``bench/toy_quality.py`` (R-precision).

Training the prior is a tool beside the package: ``bench/toy_training.py`` (driven by ``bench/toy_train.py``).
"""
