"""Train the shipped toy prior ``models/dreamflow-toy`` (and the benchmark's classifier) on the toy world.

On the GPU machine (the ``device`` tool; diffusers travels as a wheel), writing at most 8 files to $OUT::

    python3 bench/toy_train.py --out $OUT            # ~9 min on one H100
    python3 bench/toy_train.py --smoke --out /tmp/t  # CPU, tiny sizes, < 2 min: checks the whole script

Back here, build the diffusers folder from the returned weights::

    .venv/bin/python bench/toy_train.py --assemble <files_at> --dest models/dreamflow-toy

Steps: render the world once (seeded), train the VAE, set its latent scale, train UNet + text encoder under a
wall-clock budget, sample a check grid, train the classifier on held-out views and score the prior's samples
with it. Prints a table (steps, losses, time); everything is in ``train_log.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

WEIGHT_FILES = {"unet": "unet.safetensors", "vae": "vae.safetensors", "text_encoder": "text_encoder.safetensors"}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "out/toy_train"), help="output folder ($OUT on the device)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: check the script end to end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--views-per-shape", type=int, default=4096, help="upper bound; see --render-budget-s")
    p.add_argument("--render-budget-s", type=float, default=100.0, help="time allowed for rendering the main bank")
    p.add_argument("--deadline-s", type=float, default=540.0, help="whole run; the UNet budget shrinks to fit")
    p.add_argument("--reserve-s", type=float, default=110.0, help="time kept for sampling, classifier and saving")
    p.add_argument("--render-batch", type=int, default=256)
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--vae-batch", type=int, default=128)
    p.add_argument("--unet-budget-s", type=float, default=330.0, help="wall-clock budget of the UNet loop")
    p.add_argument("--unet-max-steps", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--classifier-views", type=int, default=768, help="held-out views per shape for the classifier")
    p.add_argument("--classifier-steps", type=int, default=2500)
    p.add_argument("--init", default=None,
                   help="fine-tune this toy prior folder (e.g. models/dreamflow-toy): its VAE is kept (no VAE training, "
                        "same latent scale), its UNet and text encoder are the starting point")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet forward (default mode)")
    p.add_argument("--keep-classifier", action="store_true",
                   help="with --init: keep its classifier (same world and cameras) instead of training one")
    p.add_argument("--warmup", type=int, default=300, help="UNet learning-rate warm-up steps")
    p.add_argument("--assemble", default=None, help="folder with the returned weights: build the diffusers folder")
    p.add_argument("--dest", default="models/dreamflow-toy", help="with --assemble: where the model goes")
    return p.parse_args(argv)


def kept_classifier(args) -> str:
    """The classifier file ``--keep-classifier`` keeps (from ``--init``), "" without the flag; exits if it is missing."""
    if not args.keep_classifier:
        return ""
    path = os.path.join(args.init or "", "classifier", "model.safetensors")
    if not (args.init and os.path.isfile(path)):
        raise SystemExit(f"--keep-classifier needs --init with a classifier/model.safetensors (looked for {path})")
    return path


def assemble(src: str, dest: str) -> None:
    """Build ``dest`` (diffusers layout) from the weight files a device run returned in ``src``."""
    from safetensors.torch import load_file

    from dreamflow.toy.prior import ToyPriorConfig, build_toy_prior, folder_size_mb, install_weights

    with open(os.path.join(src, "train_log.json")) as f:
        log = json.load(f)
    cfg = ToyPriorConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in log["prior_config"].items()})
    tmp = tempfile.mkdtemp(prefix="dreamflow-toy-")
    try:
        build_toy_prior(tmp, cfg, seed=0)
        weights = {k: load_file(os.path.join(src, f)) for k, f in WEIGHT_FILES.items()}
        card = {k: log[k] for k in ("card", "command", "seed") if k in log}
        install_weights(tmp, weights, log["scaling_factor"], card=card)
        cls = os.path.join(src, "classifier.safetensors")
        if not os.path.isfile(cls):  # trained with --keep-classifier: the destination's classifier stays
            cls = os.path.join(dest, "classifier", "model.safetensors")
        if os.path.isfile(cls):
            os.makedirs(os.path.join(tmp, "classifier"), exist_ok=True)
            shutil.copy(cls, os.path.join(tmp, "classifier", "model.safetensors"))
        if os.path.isdir(dest):
            shutil.rmtree(dest)
        shutil.copytree(tmp, dest)
        for root, dirs, files in os.walk(dest):  # mkdtemp made everything private; the repo wants 644/755
            os.chmod(root, 0o755)
            for n in files:
                os.chmod(os.path.join(root, n), 0o644)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"assembled {dest}: {folder_size_mb(dest):.1f} MB")


def main(argv=None) -> int:
    args = parse(argv)
    if args.assemble:
        assemble(args.assemble, args.dest)
        return 0
    kept_classifier(args)  # a wrong --keep-classifier fails now, not after minutes of training
    from safetensors.torch import save_file

    from dreamflow.denoisers.denoiser import alphas_cumprod_from_config
    import toy_training as T  # beside this script (bench/toy_training.py)
    from dreamflow.toy.classifier import ClassifierConfig, ToyClassifier, accuracy, load_classifier, save_classifier
    from dreamflow.toy.prior import ToyPriorConfig, build_toy_prior, load_trainable
    from dreamflow.toy.world import COLOUR_NAMES, SHAPES, WorldConfig

    t_start = time.time()
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.views_per_shape, args.render_batch, args.vae_steps, args.vae_batch = 8, 8, 6, 8
        args.unet_max_steps, args.batch, args.classifier_views, args.classifier_steps = 6, 8, 4, 6
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    os.makedirs(args.out, exist_ok=True)
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    log(f"device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}), torch {torch.__version__}")
    prior_cfg = ToyPriorConfig()
    world = WorldConfig()
    work = None  # a fresh, randomly initialised prior folder (not needed when fine-tuning --init)
    if args.init:
        log(f"fine-tuning {args.init} (its VAE kept)")
    else:
        work = tempfile.mkdtemp(prefix="toy-skeleton-")
        build_toy_prior(work, prior_cfg, seed=args.seed)
    src = args.init or work
    unet, vae, te, tok = load_trainable(src)
    sched_cfg = json.load(open(os.path.join(src, "scheduler", "scheduler_config.json")))
    unet.to(dev), vae.to(dev), te.to(dev)
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in (("unet", unet), ("vae", vae), ("text_encoder", te))}
    log(f"parameters: {n_params}")

    # 1. Render the world once.
    t0 = time.time()
    per_view = None
    if not args.smoke:
        args.views_per_shape, per_view = T.views_within(args.render_budget_s, args.views_per_shape, args.render_batch, dev)
        log(f"render: {per_view * 1000:.2f} ms per view (torus) -> {args.views_per_shape} views per shape")
    bank = T.render_bank(args.views_per_shape, seed=args.seed, cfg=world, device=dev, batch=args.render_batch, log=log)
    t_render = time.time() - t0
    log(f"rendered {len(bank)} views in {t_render:.1f} s")
    gen = torch.Generator().manual_seed(args.seed + 1)

    # 2-3. VAE.
    t0 = time.time()
    if args.init:
        args.vae_steps, vae_rows = 0, []
    else:
        vae_rows = T.train_vae(vae, lambda s: T.compose_batch(bank, args.vae_batch, gen, world)["images"],
                               args.vae_steps, log=log, log_every=max(1, min(250, args.vae_steps)))
    with torch.no_grad():
        probe = torch.cat([T.compose_batch(bank, 256 if not args.smoke else 8, gen, world)["images"] for _ in range(8)])
        scale = float(vae.config.scaling_factor) if args.init else T.latent_scale(vae, probe)
        rec = vae.decode(vae.encode(probe[:256] * 2 - 1).latent_dist.mean).sample
        vae_psnr = float(-10 * torch.log10(((rec.clamp(-1, 1) + 1) / 2 - probe[:256]).square().mean()))
    t_vae = time.time() - t0
    log(f"VAE: {t_vae:.1f} s, latent scale {scale:.4f}, reconstruction PSNR {vae_psnr:.2f} dB")
    for p in vae.parameters():
        p.requires_grad_(False)

    # 4. UNet + text encoder.
    captions = T.caption_table()
    token_ids = T.tokenize(tok, captions)
    ucfg = T.UNetTrainConfig(batch=args.batch, lr=args.lr, warmup=args.warmup, max_steps=args.unet_max_steps,
                             budget_s=args.unet_budget_s,
                             log_every=1 if args.smoke else 250, compile=args.compile)
    acp = alphas_cumprod_from_config(sched_cfg)
    ucfg.budget_s = max(30.0, min(ucfg.budget_s, args.deadline_s - (time.time() - t_start) - args.reserve_s))
    log(f"UNet budget {ucfg.budget_s:.0f} s (elapsed {time.time() - t_start:.0f} s)")
    t0 = time.time()
    unet_rows, ema = T.train_unet(unet, te, vae, scale, token_ids,
                                  lambda s: T.compose_batch(bank, args.batch, gen, world), acp, ucfg, log=log)
    t_unet = time.time() - t0
    unet.load_state_dict(ema["unet"])
    te.load_state_dict(ema["text_encoder"], strict=False)

    # 5. Check grid: every class, front and side views.
    classes = [(s, c) for s in range(len(SHAPES)) for c in range(len(COLOUR_NAMES))]
    per_class = 2 if args.smoke else 8
    sid = torch.tensor([s for s, _ in classes for _ in range(per_class)])
    cid = torch.tensor([c for _, c in classes for _ in range(per_class)])
    vid = torch.tensor([i % 3 for _ in classes for i in range(per_class)])  # front / side / back
    with torch.no_grad():
        samples = torch.cat([T.sample(unet, te, vae, scale, token_ids, T.caption_index(sid, cid, vid)[i:i + 112],
                                      sched_cfg, steps=5 if args.smoke else 30, seed=args.seed + i)
                             for i in range(0, sid.shape[0], 112)])
    _save_grid(samples, os.path.join(args.out, "samples.png"), per_class)

    # 6. Classifier on held-out views (other seeds), then the prior's samples scored by it.
    t0 = time.time()
    keep = kept_classifier(args)
    if keep:
        clf, clf_rows = load_classifier(keep, device=str(dev)), []
        log(f"classifier: kept {keep}")
    else:
        if per_view is not None:  # keep the classifier's two banks within ~30 s
            cap = int(30.0 / (1.25 * per_view * len(SHAPES))) // args.render_batch * args.render_batch
            args.classifier_views = max(args.render_batch, min(args.classifier_views, cap))
            log(f"classifier bank: {args.classifier_views} views per shape")
        bank_c = T.render_bank(args.classifier_views, seed=args.seed + 1000, cfg=world, device=dev, batch=args.render_batch)
        clf = ToyClassifier(ClassifierConfig()).to(dev)
        gen_c = torch.Generator().manual_seed(args.seed + 3)
        clf_rows = T.train_classifier(clf, lambda s: T.compose_batch(bank_c, 256 if not args.smoke else 8, gen_c, world),
                                      args.classifier_steps, log=log, log_every=max(1, min(500, args.classifier_steps)))
    bank_test = T.render_bank(max(2, args.classifier_views // 4), seed=args.seed + 2000, cfg=world, device=dev,
                              batch=args.render_batch)
    test = T.compose_batch(bank_test, len(bank_test), torch.Generator().manual_seed(args.seed + 4), world,
                           index=torch.arange(len(bank_test)))
    clf_acc = accuracy(clf, test["images"], test["shape_id"], test["colour_id"])
    sample_acc = accuracy(clf, samples, sid.to(dev), cid.to(dev))
    t_clf = time.time() - t0
    log(f"classifier: {t_clf:.1f} s; held-out views {clf_acc}; prior samples (DDIM 30, CFG 4) {sample_acc}")

    # Save (<= 8 files; the folder is assembled back home).
    save_file({k: v.half().contiguous() for k, v in ema["unet"].items()}, os.path.join(args.out, WEIGHT_FILES["unet"]))
    save_file({k: v.detach().half().contiguous() for k, v in vae.state_dict().items()}, os.path.join(args.out, WEIGHT_FILES["vae"]))
    save_file({k: v.half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in te.state_dict().items()},
              os.path.join(args.out, WEIGHT_FILES["text_encoder"]))
    if not keep:
        save_classifier(clf.cpu(), os.path.join(args.out, "classifier.safetensors"),
                        {"held_out_accuracy": clf_acc, "train_seed": args.seed + 1000})
    card = {"parameters": n_params, "views_rendered": len(bank), "render_s": round(t_render, 1),
            "vae_steps": args.vae_steps, "vae_batch": args.vae_batch, "vae_s": round(t_vae, 1), "vae_psnr_db": round(vae_psnr, 2),
            "unet_steps": unet_rows[-1]["step"] if unet_rows else 0, "unet_batch": args.batch, "unet_s": round(t_unet, 1),
            "final_loss_minsnr": unet_rows[-1]["loss_minsnr"] if unet_rows else None,
            "final_mse_eps": unet_rows[-1]["mse_eps"] if unet_rows else None,
            "classifier_held_out": clf_acc, "prior_sample_accuracy": sample_acc, "total_s": round(time.time() - t_start, 1),
            "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__}
    out = {"command": " ".join(["python3", "bench/toy_train.py"] + (argv if argv is not None else sys.argv[1:])),
           "seed": args.seed, "prior_config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(prior_cfg).items()},
           "scaling_factor": scale, "card": card, "vae_log": vae_rows, "unet_log": unet_rows, "classifier_log": clf_rows,
           "console": lines}
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(out, f, indent=1)
    print("\n| phase | steps | batch | final loss | time (s) |\n|---|---|---|---|---|")
    print(f"| render | {len(bank)} views | {args.render_batch} | - | {t_render:.1f} |")
    if vae_rows:
        print(f"| VAE | {args.vae_steps} | {args.vae_batch} | l1 {vae_rows[-1]['l1']:.4f} | {t_vae:.1f} |")
    if unet_rows:
        print(f"| UNet + text | {unet_rows[-1]['step']} | {args.batch} | min-SNR {unet_rows[-1]['loss_minsnr']:.4f} | {t_unet:.1f} |")
    print(f"| classifier | {'kept' if keep else args.classifier_steps} | 256 | joint acc {clf_acc['joint']:.3f} | {t_clf:.1f} |")
    print(f"total {time.time() - t_start:.1f} s")
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _save_grid(images: torch.Tensor, path: str, per_row: int) -> None:
    from PIL import Image

    n, _, h, w = images.shape
    rows = n // per_row
    grid = images[:rows * per_row].view(rows, per_row, 3, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, per_row * w, 3)
    Image.fromarray((grid.float().cpu().numpy() * 255).round().astype("uint8")).save(path)


if __name__ == "__main__":
    sys.exit(main())
