"""What the toy prior itself draws (issue 15): 2D samples of ``"a <colour> <shape>, <view> view"`` against the toy
world's true renders of the same captions, per shape and view word, on two silhouette measures:

* aspect: width / height of the foreground's bounding box;
* solidity: foreground area / its convex hull's area (1 for a convex silhouette; a star or a blob with arms < 1).

A 3D method can only distil what its prior draws: where the prior's samples are already wrong (a cube seen from
above drawn as a star), no guidance makes the right object. Samples: DDIM (eta 0, 30 steps, CFG 7.5, the stages'
guidance scale) through ``Denoiser.predict_eps``; foreground = pixels whose colour differs from the image's corner
(solid backgrounds in the world and, as learned, in the samples) by more than 0.25 (sum over RGB).

    python bench/prior_probe.py --shapes cube cylinder --n 12 --out bench/prior_probe.jpg
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402


@torch.no_grad()
def ddim_samples(denoiser, prompt: str, n: int, steps: int = 30, cfg_scale: float = 7.5, seed: int = 0):
    """[n, 3, H, W] images in [0, 1]: deterministic DDIM from t 0.98 to 0 with classifier-free guidance."""
    emb = denoiser.encode_prompt([prompt] * n)
    shape = denoiser.encode_images(torch.full((1, 3, 64, 64), 0.5), sample=False).shape[1:]
    z = torch.randn((n,) + tuple(shape), generator=torch.Generator().manual_seed(seed))
    ts = torch.linspace(0.98, 0.0, steps + 1).tolist()
    for t, t_next in zip(ts[:-1], ts[1:]):
        eps = denoiser.predict_eps(z, t, emb, cfg_scale)
        x0 = denoiser.x0_from_eps(z, eps, t)
        ab = denoiser.alpha_bar(t_next) if t_next > 0 else torch.tensor(1.0)
        z = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    return denoiser.decode_latents(z).clamp(0, 1)


def silhouette(img: torch.Tensor) -> np.ndarray:
    """[3, H, W] image -> [H, W] bool foreground (differs from the corner colour)."""
    bg = img[:, :2, :2].reshape(3, -1).mean(1)
    return ((img - bg[:, None, None]).abs().sum(0) > 0.25).numpy()


def measures(mask: np.ndarray):
    """(aspect, solidity) of a foreground mask; NaNs when it is (almost) empty."""
    from skimage.morphology import convex_hull_image

    ys, xs = np.nonzero(mask)
    if len(xs) < 10:
        return float("nan"), float("nan")
    aspect = (xs.max() - xs.min() + 1) / (ys.max() - ys.min() + 1)
    return float(aspect), float(mask.sum() / max(1, convex_hull_image(mask).sum()))


def main(argv=None) -> int:
    from PIL import Image

    from dreamflow.denoisers import Denoiser
    from dreamflow.toy.world import COLOUR_NAMES, SHAPES, caption, render_world

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    p.add_argument("--views", nargs="+", default=["front", "side", "overhead"])
    p.add_argument("--n", type=int, default=12, help="samples per caption")
    p.add_argument("--world-views", type=int, default=300, help="true renders per shape (split by view word)")
    p.add_argument("--out", default="prior_probe.png", help="grid of the samples (rows: captions)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    den = Denoiser.load("dreamflow-toy", device="cpu")
    grid = []
    print("| caption | world aspect | prior aspect | world solidity | prior solidity |\n|---|---|---|---|---|")
    for i, shape in enumerate(args.shapes):
        colour = COLOUR_NAMES[i % len(COLOUR_NAMES)]
        imgs, caps = render_world(shape, colour, args.world_views, seed=3)
        world = {}
        for im, cap in zip(imgs, caps):
            world.setdefault(cap.split(", ")[1].replace(" view", ""), []).append(measures(silhouette(im.permute(2, 0, 1))))
        for view in args.views:
            prompt = f"{caption(shape, colour)}, {view} view"
            x = ddim_samples(den, prompt, args.n, seed=i)
            got = [measures(silhouette(im)) for im in x]
            w = np.nanmedian(np.asarray(world.get(view, [(np.nan, np.nan)])), 0)
            g = np.nanmedian(np.asarray(got), 0)
            print(f"| {prompt} | {w[0]:.2f} | {g[0]:.2f} | {w[1]:.2f} | {g[1]:.2f} |", flush=True)
            grid.append(torch.cat(list(x), 2))
    im = torch.cat(grid, 1).permute(1, 2, 0).numpy()
    Image.fromarray((im * 255).round().astype(np.uint8)).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
