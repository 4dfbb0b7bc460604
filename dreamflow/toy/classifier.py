"""A small shape x colour classifier of toy-world images: the judge of the quality benchmark (R-precision).

Two heads on one CNN: shape (7 classes) and colour (6); the (shape, colour) class of an image is the pair of
arg-maxes (the joint log-probability is the sum of the two heads'). It is trained on world renders made with
other seeds than the prior's data, with augmentations that make it judge the object, not the picture
(lesson of issue 8's probe: a classifier trained on clean renders scored recognisable generated objects as
wrong): any solid or two-tone background, per-channel tint and brightness / contrast / saturation jitter,
random zoom and shift, blur and noise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DreamFlowError
from .world import COLOUR_NAMES, SHAPES

FORMAT = "dreamflow-toy-classifier"
VERSION = 1


@dataclass
class ClassifierConfig:
    """Classifier size and training augmentations (ours)."""

    channels: Tuple[int, ...] = (32, 64, 128, 128)
    """Conv channels per stage; each stage halves the image (64 -> 4 px), then global average pooling."""
    resolution: int = 64
    """Input size, px (inputs of another size are resized)."""
    tint: float = 0.15
    """Per-channel gain in [1 - tint, 1 + tint] (colour casts of generated renders)."""
    brightness: float = 0.15
    """Added brightness in [-b, b]."""
    contrast: float = 0.25
    """Contrast factor in [1 - c, 1 + c] about the image mean."""
    saturation: float = 0.35
    """Saturation factor in [1 - s, 1 + s] (generated colours are often washed out)."""
    zoom: Tuple[float, float] = (0.75, 1.35)
    """Random zoom range (object size varies with the NeRF's extent)."""
    shift: float = 0.12
    """Random shift, fraction of the half image."""
    blur_prob: float = 0.4
    """Probability of a 2x down-up blur (generated renders are soft)."""
    noise: float = 0.03
    """Std of added Gaussian pixel noise."""


class ToyClassifier(nn.Module):
    """CNN with a shape head and a colour head. Input [B, 3, H, W] in [0, 1]; outputs two logit tensors."""

    def __init__(self, config: Optional[ClassifierConfig] = None):
        super().__init__()
        self.config = cfg = config or ClassifierConfig()
        layers, c_in = [], 3
        for c in cfg.channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU(), nn.AvgPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.shape_head = nn.Linear(c_in, len(SHAPES))
        self.colour_head = nn.Linear(c_in, len(COLOUR_NAMES))

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        """images [B, 3, H, W] in [0, 1] -> (shape logits [B, 7], colour logits [B, 6])."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise DreamFlowError(f"toy classifier expects [B, 3, H, W] images, got {tuple(images.shape)}")
        r = self.config.resolution
        if images.shape[-2:] != (r, r):
            images = F.interpolate(images, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        h = self.features(images * 2 - 1).mean(dim=(2, 3))
        return self.shape_head(h), self.colour_head(h)

    @torch.no_grad()
    def log_probs(self, images: Tensor) -> Tensor:
        """[B, 7, 6] joint log p(shape) + log p(colour) (class order of ``world.class_names``: shape-major)."""
        s, c = self(images)
        return F.log_softmax(s.float(), -1).unsqueeze(2) + F.log_softmax(c.float(), -1).unsqueeze(1)


def augment(images: Tensor, opacity: Optional[Tensor], cfg: ClassifierConfig, generator: torch.Generator) -> Tensor:
    """Training augmentations (module docstring). images [B, 3, H, W] in [0, 1]; returns the same shape.

    ``opacity`` [B, 1, H, W] (or None) is only used to swap backgrounds for a two-tone one on some images.
    """
    B, dev = images.shape[0], images.device

    def u(lo, hi, *shape):
        return (lo + (hi - lo) * torch.rand(*shape, generator=generator)).to(dev)

    x = images
    if opacity is not None:
        # Two-tone (vertical gradient) backgrounds on a third of the images: NeRF backgrounds are not solid.
        top, bottom = u(0, 1, B, 3, 1, 1), u(0, 1, B, 3, 1, 1)
        ramp = torch.linspace(0, 1, x.shape[2], device=dev).view(1, 1, -1, 1)
        bg = top * (1 - ramp) + bottom * ramp
        use = (u(0, 1, B, 1, 1, 1) < 0.33).float()
        x = x * (1 - use) + (x * opacity + bg * (1 - opacity)) * use
    # Geometry: zoom and shift through one affine resampling (border colour = the edge pixels).
    s = u(*cfg.zoom, B)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0] = 1 / s
    theta[:, 1, 1] = 1 / s
    theta[:, :, 2] = u(-cfg.shift, cfg.shift, B, 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # Photometric jitter.
    grey = x.mean(1, keepdim=True)
    x = grey + (x - grey) * u(1 - cfg.saturation, 1 + cfg.saturation, B, 1, 1, 1)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    x = m + (x - m) * u(1 - cfg.contrast, 1 + cfg.contrast, B, 1, 1, 1)
    x = x * u(1 - cfg.tint, 1 + cfg.tint, B, 3, 1, 1) + u(-cfg.brightness, cfg.brightness, B, 1, 1, 1)
    blur = (u(0, 1, B, 1, 1, 1) < cfg.blur_prob).float()
    soft = F.interpolate(F.avg_pool2d(x, 2), size=x.shape[-2:], mode="bilinear", align_corners=False)
    x = x * (1 - blur) + soft * blur
    x = x + cfg.noise * torch.randn(x.shape, generator=generator).to(dev)
    return x.clamp(0, 1)


def loss_fn(model: ToyClassifier, images: Tensor, shape_ids: Tensor, colour_ids: Tensor) -> Tensor:
    """Sum of the two heads' cross-entropies."""
    s, c = model(images)
    return F.cross_entropy(s.float(), shape_ids) + F.cross_entropy(c.float(), colour_ids)


@torch.no_grad()
def accuracy(model: ToyClassifier, images: Tensor, shape_ids: Tensor, colour_ids: Tensor,
             batch: int = 256) -> Dict[str, float]:
    """Shape, colour and joint (both right) accuracy on a labelled set, in [0, 1]."""
    model.eval()
    ok_s, ok_c, ok = 0, 0, 0
    for i in range(0, images.shape[0], batch):
        s, c = model(images[i:i + batch])
        ps, pc = s.argmax(-1), c.argmax(-1)
        ok_s += int((ps == shape_ids[i:i + batch]).sum())
        ok_c += int((pc == colour_ids[i:i + batch]).sum())
        ok += int(((ps == shape_ids[i:i + batch]) & (pc == colour_ids[i:i + batch])).sum())
    n = max(1, images.shape[0])
    return {"shape": ok_s / n, "colour": ok_c / n, "joint": ok / n}


def save_classifier(model: ToyClassifier, path: str, extra: Optional[dict] = None) -> str:
    """Write the weights (float16) and config to one safetensors file (DreamFlow state header)."""
    from ..io import save_state_file

    header = {"format": FORMAT, "version": VERSION, "config": asdict(model.config), **(extra or {})}
    return save_state_file(path, {k: v.half() for k, v in model.state_dict().items()}, header)


def load_classifier(path: str, device: str = "cpu") -> ToyClassifier:
    """Read a classifier written by :func:`save_classifier` (float32, eval mode)."""
    from ..io import load_module_tensors, load_state_file

    tensors, header = load_state_file(path, FORMAT, VERSION)
    cfg = dict(header["config"])
    cfg["channels"] = tuple(cfg["channels"])
    cfg["zoom"] = tuple(cfg["zoom"])
    model = ToyClassifier(ClassifierConfig(**cfg))
    load_module_tensors(model, {k: v.float() for k, v in tensors.items()}, "", path)
    return model.to(device).eval()


def r_precision(log_probs: Tensor, targets: Sequence[Tuple[int, int]]) -> Dict[str, float]:
    """R-precision (R = 1) of generated objects over the world's prompts.

    Args:
        log_probs: [N, V, 7, 6] per object N and render view V (``ToyClassifier.log_probs``).
        targets: N (shape index, colour index) prompts the objects were made from.
    Returns:
        ``r_precision``: fraction of objects whose prompt is the top-scoring one of all 42 world prompts
        (views' log-probabilities summed); ``shape`` and ``colour``: the same per attribute.
    """
    joint = log_probs.sum(1)  # [N, 7, 6]
    n = joint.shape[0]
    flat = joint.reshape(n, -1).argmax(-1)
    ps, pc = flat // joint.shape[2], flat % joint.shape[2]
    ts = torch.tensor([t[0] for t in targets])
    tc = torch.tensor([t[1] for t in targets])
    return {"r_precision": float(((ps == ts) & (pc == tc)).float().mean()),
            "shape": float((ps == ts).float().mean()), "colour": float((pc == tc).float().mean())}
