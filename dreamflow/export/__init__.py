"""Export: UV atlas (``uv``), texture bake (``bake``), textured GLB writer (``glb``).

``export_glb(vertices, faces, color_fn, path, ExportConfig())`` is the whole job (unwrap, bake, write);
the pieces are public for custom pipelines and tests; ``render_textured_turntable`` shows what the GLB holds. See ``uv.py`` for the UV convention.
"""

from .bake import bake_texture, dilate_texture, sample_texture
from .glb import ExportConfig, export_glb, render_textured_turntable, turntable_path, write_glb
from .uv import uv_unwrap

__all__ = ["ExportConfig", "export_glb", "write_glb", "render_textured_turntable", "turntable_path",
           "bake_texture", "dilate_texture", "sample_texture", "uv_unwrap"]
