"""Export: UV atlas (``uv``), texture bake (``bake``), textured GLB writer (``glb``).

``export_glb(vertices, faces, color_fn, path, ExportConfig())`` is the whole job (unwrap, bake, write);
the pieces are public for custom pipelines and tests. See ``uv.py`` for the UV convention.
"""

from .bake import bake_texture, dilate_texture
from .glb import ExportConfig, export_glb, write_glb
from .uv import uv_unwrap

__all__ = ["ExportConfig", "export_glb", "write_glb", "bake_texture", "dilate_texture", "uv_unwrap"]
