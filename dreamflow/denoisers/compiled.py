"""``torch.compile`` of the UNet's (and VAE encoder's) repeated blocks, under the fast path's CUDA graphs
(``FastPathConfig.compile``; why: that field's docstring)."""

from __future__ import annotations

from typing import List, Tuple

import torch

#: FastPathConfig.compile choices.
COMPILE_MODES = ("blocks", "unet", "off")
#: UNet sub-module classes compiled by compile="blocks" (every SD / SDXL UNet is made of these).
COMPILED_BLOCKS = ("ResnetBlock2D", "BasicTransformerBlock")


def compile_blocks(root: torch.nn.Module, mode: str, blocks: Tuple[str, ...] = COMPILED_BLOCKS) -> List[torch.nn.Module]:
    """Compile, in place (``nn.Module.compile``: the module objects stay, only their call changes), ``root`` itself
    (mode "unet") or its sub-modules whose class name is in ``blocks`` (mode "blocks"; a UNet or a VAE encoder).

    Returns the compiled modules (give them to :func:`uncompile`). Raises the recompile limit: one block
    class serves several shapes (resolution levels, CFG vs scene batch, LoRA on / off, grad / no grad).
    """
    if mode == "off":
        return []
    import torch._dynamo

    from ..compile_cache import use_persistent_compile_cache

    use_persistent_compile_cache()  # before the first compile: kernels kept between reboots

    # The SDXL refiner's ResnetBlock2D alone meets ~60 shapes (levels x in/out widths x CFG / scene / LoRA-step
    # batches x grad on / off): it hit a limit of 64 in a GPU run (bench/RESULTS.md, "Figures moved from
    # docstrings"), after which shapes ran eagerly.
    for name, value in (("recompile_limit", 512), ("cache_size_limit", 512), ("accumulated_recompile_limit", 4096),
                        ("accumulated_cache_size_limit", 4096)):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), value))
    mods = [root] if mode == "unet" else [m for m in root.modules() if type(m).__name__ in blocks]
    for m in mods:
        m.compile(dynamic=False)
    return mods



def uncompile(modules: List[torch.nn.Module]) -> None:
    """Undo :func:`compile_blocks` (back to the modules' eager calls)."""
    for m in modules:
        m._compiled_call_impl = None
