"""Find and load pretrained denoisers: diffusers folders and single-file ``.safetensors`` checkpoints.

Where names are looked up (:func:`resolve_model`), in order:

1. the name as a filesystem path (folder or file);
2. hosted in ComfyUI: ``models/diffusers/<name>`` (``folder_paths.get_folder_paths("diffusers")``) and
   ``models/checkpoints/<name>`` (``folder_paths.get_full_path("checkpoints", name)``);
3. this repository's ``models/`` folder (the shipped toy prior ``dreamflow-toy``);
4. a known model's other names (:data:`MODEL_ALIASES`): ``stable-diffusion-2-1-base`` finds
   ``v2-1_512-ema-pruned.safetensors`` in models/checkpoints and the other way round.

Folders load component by component with the real ``from_pretrained(subfolder=...)``, ``local_files_only=True``,
``use_safetensors=True``. Single files go through diffusers' ``from_single_file`` with a config folder kept in
``dreamflow/denoisers/configs/`` (no weights), picked from the checkpoint's keys and shapes. Nothing here
unpickles: ``.bin``/``.ckpt``/``.pt`` weights are refused with the conversion recipe.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import hosting
from ..errors import DreamFlowError
from ..io import PICKLE_EXTENSIONS, _looks_like_safetensors, read_json_object, refuse_pickle

log = logging.getLogger("dreamflow")

#: Config folders (model_index.json + component configs, no weights) for single-file checkpoints.
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
#: The repository's own model folder (the shipped toy prior lives at ``models/dreamflow-toy``).
REPO_MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "models")
#: Environment variable naming a folder with CLIP ``vocab.json`` + ``merges.txt`` (headless single-file loading).
TOKENIZER_ENV = "DREAMFLOW_CLIP_TOKENIZER"

#: ``model_index.json`` ``_class_name`` -> our kind.
SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionXLImg2ImgPipeline": "sdxl_refiner",
}
#: Components each kind needs (folder name -> loader kind).
KIND_COMPONENTS = {
    "sd": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl_refiner": ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler"),
}
_WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@dataclass
class LoadedComponents:
    """What a loader hands to :class:`~dreamflow.denoisers.Denoiser` (all on CPU, frozen later)."""

    kind: str
    """"sd" or "sdxl_refiner"."""
    path: str
    """Absolute path of the folder or file that was loaded."""
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict
    """The scheduler's config dict (betas, prediction_type, num_train_timesteps)."""
    model_index: dict
    """The pipeline's model_index.json (for flags such as force_zeros_for_empty_prompt)."""
    text_encoder: Optional[torch.nn.Module] = None
    tokenizer: object = None
    text_encoder_2: Optional[torch.nn.Module] = None
    tokenizer_2: object = None
    extras: Dict[str, object] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Names and search paths
# --------------------------------------------------------------------------------------------
def _is_pipeline_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json"))


def _search_locations() -> List[Tuple[str, str]]:
    """``(label, folder)`` pairs searched for names, in order (see the module docstring)."""
    locs: List[Tuple[str, str]] = []
    fp = hosting.folder_paths()
    if fp is not None:
        for kind in ("diffusers", "checkpoints"):
            try:
                for d in fp.get_folder_paths(kind):
                    locs.append((kind, d))
            except Exception:  # a ComfyUI without that folder type
                pass
    locs.append(("shipped", REPO_MODELS_DIR))
    return locs


#: The same pretrained model under the names it is published as: the diffusers folder (the Hugging Face repo's
#: name, listed first: what workflows and the README use) and its single-file checkpoints in ComfyUI's
#: models/checkpoints. A name that is missing resolves to whichever other name of its group is present, and the
#: dropdown lists the first name whenever any of the group is there, so a workflow finds the model in either form.
MODEL_ALIASES: Tuple[Tuple[str, ...], ...] = (
    ("stable-diffusion-2-1-base", "v2-1_512-ema-pruned.safetensors", "v2-1_512-nonema-pruned.safetensors"),
    ("stable-diffusion-2-1", "v2-1_768-ema-pruned.safetensors", "v2-1_768-nonema-pruned.safetensors"),
    ("stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.safetensors"),
    ("stable-diffusion-xl-refiner-1.0", "sd_xl_refiner_1.0.safetensors", "sd_xl_refiner_1.0_0.9vae.safetensors"),
)


def aliases(name: str) -> Tuple[str, ...]:
    """The other names of ``name``'s model (:data:`MODEL_ALIASES`), in order; ``()`` for an unknown name."""
    for group in MODEL_ALIASES:
        if name in group:
            return tuple(n for n in group if n != name)
    return ()


def _available_names() -> List[str]:
    """Diffusers folders, ``.safetensors`` checkpoints and shipped models found on this machine."""
    names = set()
    fp = hosting.folder_paths()
    if fp is not None:
        try:
            for d in fp.get_folder_paths("diffusers"):
                if os.path.isdir(d):
                    names.update(n for n in os.listdir(d) if _is_pipeline_folder(os.path.join(d, n)))
        except Exception:
            pass
        try:
            names.update(n for n in fp.get_filename_list("checkpoints") if n.lower().endswith(".safetensors"))
        except Exception:
            pass
    if os.path.isdir(REPO_MODELS_DIR):
        names.update(n for n in os.listdir(REPO_MODELS_DIR) if _is_pipeline_folder(os.path.join(REPO_MODELS_DIR, n)))
    return sorted(names)


def list_models() -> List[str]:
    """Sorted names for the LoadDenoiser dropdown: diffusers folders, ``.safetensors`` checkpoints, shipped models,
    plus each model's folder name (:data:`MODEL_ALIASES`) when only another form of it is present."""
    names = set(_available_names())
    names.update(group[0] for group in MODEL_ALIASES if names & set(group))
    return sorted(names)


def _find(name: str) -> Optional[str]:
    """Where ``name`` is (see the module docstring for the order), or None."""
    if os.path.exists(name):
        return os.path.abspath(name)
    fp = hosting.folder_paths()
    if fp is not None:
        try:
            for d in fp.get_folder_paths("diffusers"):
                cand = os.path.join(d, name)
                if os.path.isdir(cand):
                    return os.path.abspath(cand)
        except Exception:
            pass
        try:
            full = fp.get_full_path("checkpoints", name)
            if full and os.path.isfile(full):
                return os.path.abspath(full)
        except Exception:
            pass
    cand = os.path.join(REPO_MODELS_DIR, name)
    if os.path.exists(cand):
        return os.path.abspath(cand)
    return None


def resolve_model(name: str) -> str:
    """Absolute path of the folder or file the user means by ``name`` (see the module docstring for the order);
    a known model's other names (:data:`MODEL_ALIASES`: diffusers folder <-> single-file checkpoint) are tried
    when ``name`` itself is not found.

    Raises:
        DreamFlowError: nothing found; the message lists where we looked and the available names.
    """
    name = (name or "").strip()
    if not name:
        raise DreamFlowError(f"no denoiser name given; pick one of: {', '.join(list_models()) or '(none found)'}")
    found = _find(name)
    if found is not None:
        return found
    for other in aliases(name):
        found = _find(other)
        if found is not None:
            log.info("DreamFlow: denoiser '%s' not found; using the same model as '%s' (%s)", name, other, found)
            return found
    where = "; ".join(f"{label}: {d}" for label, d in _search_locations())
    also = f" (nor as {' / '.join(aliases(name))})" if aliases(name) else ""
    raise DreamFlowError(
        f"denoiser '{name}' not found{also} (looked at the path itself and in {where}); add a diffusers folder with "
        f"model_index.json or a .safetensors checkpoint there, or pick one of: "
        f"{', '.join(_available_names()) or '(none found)'}")


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------
def weights_bytes(path: str) -> int:
    """Bytes of the weight files of a model folder (every .safetensors / .bin below it) or of a checkpoint file:
    what loading it will put on the device, about (the dtype may halve or double it)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for folder, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files if f.endswith((".safetensors", ".bin")))
    return total


def read_model_index(folder: str) -> dict:
    """The folder's ``model_index.json``; clear errors for a folder that is not a diffusers pipeline."""
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        hint = ""
        if glob.glob(os.path.join(folder, "*.safetensors")):
            hint = " (it holds .safetensors files: give the path of the file itself to load a single-file checkpoint)"
        raise DreamFlowError(
            f"folder '{folder}' has no model_index.json, so it is not a diffusers pipeline folder{hint}; "
            f"point at the folder that contains model_index.json, unet/, vae/ ...")
    return read_json_object(path, "model index", "re-download the model")


def detect_kind(model_index: dict, where: str = "") -> str:
    """``"sd"`` or ``"sdxl_refiner"`` from a ``model_index.json`` dict; anything else is a clear error."""
    cls = model_index.get("_class_name")
    kind = SUPPORTED_PIPELINES.get(cls)
    if kind == "sdxl_refiner":
        te = model_index.get("text_encoder")
        if te and te[0] is not None:
            raise DreamFlowError(
                f"'{where}' is an SDXL base model ({cls} with text_encoder); DreamFlow uses SD 1.x/2.x priors and "
                f"the SDXL refiner (only text_encoder_2); load stabilityai/stable-diffusion-xl-refiner-1.0 instead")
    if kind is None:
        raise DreamFlowError(
            f"'{where}' holds a {cls!r} pipeline, which DreamFlow cannot use; supported: "
            f"{', '.join(sorted(SUPPORTED_PIPELINES))} (SD 1.x/2.x and the SDXL refiner)")
    return kind


def _component_weight_files(folder: str, comp: str) -> List[str]:
    """The component's safetensors weight files; refuses pickle-only components; errors if none."""
    sub = os.path.join(folder, comp)
    if not os.path.isdir(sub):
        raise DreamFlowError(f"'{folder}' lacks the '{comp}' component folder; re-download the complete model")
    files = sorted(glob.glob(os.path.join(sub, "*.safetensors")))
    if files:
        return files
    pickles = sorted(f for f in glob.glob(os.path.join(sub, "*")) if f.lower().endswith(PICKLE_EXTENSIONS))
    if pickles:
        refuse_pickle(pickles[0], f"{comp} weights")
    raise DreamFlowError(f"no .safetensors weights in '{sub}'; re-download the model with its safetensors files")


def _transformers_dtype_kw(dtype: Optional[torch.dtype]) -> dict:
    """``dtype=`` for transformers >= 4.56, ``torch_dtype=`` before (the old name now warns)."""
    import transformers
    from packaging import version

    if dtype is None:
        return {}
    new = version.parse(version.parse(transformers.__version__).base_version) >= version.parse("4.56")
    return {"dtype": dtype} if new else {"torch_dtype": dtype}


def _first_line(e: BaseException, n: int = 160) -> str:
    s = str(e).strip().splitlines()
    s = s[0] if s else ""
    return (s[:n] + "...") if len(s) > n else s


def _load_guarded(what: str, files: List[str], fn: Callable):
    """Run a loader; a failure becomes one DreamFlowError line naming the file(s)."""
    try:
        return fn()
    except DreamFlowError:
        raise
    except Exception as e:
        names = ", ".join(f"'{f}'" for f in files)
        raise DreamFlowError(
            f"could not load {what} from {names}: {type(e).__name__}: {_first_line(e)} (truncated or corrupt file?); "
            f"re-download or re-convert it") from None


def load_folder(folder: str, dtype: Optional[torch.dtype] = None, text_dtype: Optional[torch.dtype] = None,
                vae_dtype: Optional[torch.dtype] = None) -> LoadedComponents:
    """Load a diffusers pipeline folder component by component (real ``from_pretrained`` path, CPU).

    Args:
        folder: pipeline folder with model_index.json.
        dtype: UNet dtype (``None``: as saved).
        text_dtype: text encoder dtype (``None``: ``dtype``).
        vae_dtype: VAE dtype (``None``: ``dtype``).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = os.path.abspath(folder)
    index = read_model_index(folder)
    kind = detect_kind(index, folder)
    comps = KIND_COMPONENTS[kind]
    files = {c: _component_weight_files(folder, c) for c in comps if c in _WEIGHT_COMPONENTS}
    for c in comps:
        if not os.path.isdir(os.path.join(folder, c)):
            raise DreamFlowError(f"'{folder}' lacks the '{c}' component folder; re-download the complete model")
    common = dict(local_files_only=True, use_safetensors=True)
    text_dtype = text_dtype or dtype
    vae_dtype = vae_dtype or dtype
    out = LoadedComponents(
        kind=kind, path=folder, model_index=index,
        unet=_load_guarded("the UNet", files["unet"], lambda: UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", torch_dtype=dtype, **common)),
        vae=_load_guarded("the VAE", files["vae"], lambda: AutoencoderKL.from_pretrained(
            folder, subfolder="vae", torch_dtype=vae_dtype, **common)),
        scheduler_config=read_scheduler_config(folder))
    if kind == "sd":
        out.text_encoder = _load_guarded("the text encoder", files["text_encoder"], lambda: CLIPTextModel.from_pretrained(
            os.path.join(folder, "text_encoder"), **_transformers_dtype_kw(text_dtype), **common))
        out.tokenizer = _load_guarded("the tokenizer", [os.path.join(folder, "tokenizer")],
                                      lambda: CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"),
                                                                           local_files_only=True))
    else:
        out.text_encoder_2 = _load_guarded(
            "text_encoder_2", files["text_encoder_2"], lambda: CLIPTextModelWithProjection.from_pretrained(
                os.path.join(folder, "text_encoder_2"), **_transformers_dtype_kw(text_dtype), **common))
        out.tokenizer_2 = _load_guarded("tokenizer_2", [os.path.join(folder, "tokenizer_2")],
                                        lambda: CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer_2"),
                                                                             local_files_only=True))
    return out


def read_scheduler_config(folder: str) -> dict:
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    return read_json_object(path, "scheduler config", "re-download the model")


# --------------------------------------------------------------------------------------------
# Single files
# --------------------------------------------------------------------------------------------
# Keys of original (LDM / SGM) checkpoints; names as in diffusers' single_file_utils.CHECKPOINT_KEY_NAMES.
_K_CLIP_L = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
_K_OPEN_CLIP = "cond_stage_model.model.token_embedding.weight"
_K_XL_BASE = "conditioner.embedders.1.model.positional_embedding"
_K_XL_REFINER = "conditioner.embedders.0.model.text_projection"
_K_ATTN2 = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_K_ATTN2_XL = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
_K_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
# ComfyUI (comfy/supported_models.py SD20.model_type): SD 2.x 768-v checkpoints have a wide spread in this
# norm bias (std > 0.09), eps-prediction 512 ones a narrow one; some files carry an explicit "v_pred" key.
_K_VPRED_PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
_VPRED_STD = 0.09


def pick_single_file_config(shapes: Dict[str, Tuple[int, ...]], get_tensor: Optional[Callable[[str], torch.Tensor]] = None,
                            where: str = "checkpoint") -> str:
    """Name of the config folder (in ``configs/``) that fits a checkpoint, from its keys and shapes.

    Args:
        shapes: checkpoint key -> tensor shape (read from the safetensors header; no weights needed).
        get_tensor: reads one tensor, used only to tell SD 2.x v-prediction (768) from epsilon (512 base).
        where: the file name, for messages.

    Returns:
        "sd15", "sd21" (v-prediction, 768 px), "sd21-base" (epsilon, 512 px) or "sdxl-refiner".
    """
    conv_in = shapes.get(_K_CONV_IN)
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        raise DreamFlowError(f"'{where}' is an inpainting/depth model (UNet takes {conv_in[1]} channels); use a "
                             f"text-to-image SD 1.x/2.x checkpoint or the SDXL refiner")
    if _K_XL_BASE in shapes:
        raise DreamFlowError(f"'{where}' is an SDXL base checkpoint; DreamFlow uses SD 1.x/2.x priors and the SDXL "
                             f"refiner; load sd_xl_refiner_1.0.safetensors for the refine stage")
    if _K_XL_REFINER in shapes:
        return "sdxl-refiner"
    attn2 = shapes.get(_K_ATTN2)
    if attn2 is not None and _K_CLIP_L in shapes and attn2[-1] == 768:
        return "sd15"
    if attn2 is not None and _K_OPEN_CLIP in shapes and attn2[-1] == 1024:
        if "v_pred" in shapes:
            return "sd21"
        if get_tensor is not None and _K_VPRED_PROBE in shapes:
            bias = get_tensor(_K_VPRED_PROBE).float()
            return "sd21" if float(bias.std(unbiased=False)) > _VPRED_STD else "sd21-base"
        return "sd21-base"
    raise DreamFlowError(
        f"cannot tell which model '{where}' is (no SD 1.x CLIP, SD 2.x OpenCLIP or SDXL refiner keys, e.g. {_K_ATTN2}); "
        f"supported single files: SD 1.x, SD 2.x, SDXL refiner; otherwise convert it to a diffusers folder")


def clip_tokenizer_dir() -> str:
    """Folder with CLIP ``vocab.json`` + ``merges.txt`` for single-file checkpoints (which carry no tokenizer).

    Hosted: ComfyUI's ``comfy/sd1_tokenizer`` (the same BPE serves CLIP-L, OpenCLIP-H and bigG). Headless: the
    folder named by ``$DREAMFLOW_CLIP_TOKENIZER``.
    """
    env = os.environ.get(TOKENIZER_ENV)
    cands = []
    if env:
        cands.append(env)
    mod = hosting.comfy_module("sd1_clip")
    if mod is not None and getattr(mod, "__file__", None):
        cands.append(os.path.join(os.path.dirname(mod.__file__), "sd1_tokenizer"))
    for d in cands:
        if os.path.isfile(os.path.join(d, "vocab.json")) and os.path.isfile(os.path.join(d, "merges.txt")):
            return d
    raise DreamFlowError(
        f"single-file checkpoints need the CLIP tokenizer files (vocab.json, merges.txt), which they do not contain; "
        f"looked in {cands or ['$' + TOKENIZER_ENV + ' (unset)', 'ComfyUI comfy/sd1_tokenizer (not hosted)']}; run inside "
        f"ComfyUI, set {TOKENIZER_ENV} to a folder with those two files, or use a diffusers folder")


def read_checkpoint_shapes(path: str) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape from a safetensors header (reads no weights); clear errors for pickle / corrupt files."""
    from safetensors import safe_open

    refuse_pickle(path, "checkpoint")
    if not path.lower().endswith(".safetensors"):
        raise DreamFlowError(f"'{path}' is neither a diffusers folder nor a .safetensors checkpoint; give one of those")
    if not _looks_like_safetensors(path):
        raise DreamFlowError(f"checkpoint '{path}' is not a valid safetensors file (truncated or corrupt); re-download it")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise DreamFlowError(f"checkpoint '{path}' is truncated or corrupt ({type(e).__name__}); re-download it") from None


def load_single_file(path: str, dtype: Optional[torch.dtype] = None, text_dtype: Optional[torch.dtype] = None,
                     vae_dtype: Optional[torch.dtype] = None, config_dir: Optional[str] = None,
                     tokenizer_dir: Optional[str] = None) -> LoadedComponents:
    """Load an original-format ``.safetensors`` checkpoint through diffusers' ``from_single_file`` (CPU).

    Args:
        path: the checkpoint file.
        dtype, text_dtype, vae_dtype: as :func:`load_folder`.
        config_dir: config folder to use (default: picked by :func:`pick_single_file_config` from ``configs/``).
        tokenizer_dir: CLIP tokenizer folder (default: :func:`clip_tokenizer_dir`).
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline
    from safetensors import safe_open
    from transformers import CLIPTokenizer

    path = os.path.abspath(path)
    shapes = read_checkpoint_shapes(path)
    if config_dir is None:
        def get_tensor(k):
            with safe_open(path, framework="pt", device="cpu") as f:
                return f.get_tensor(k)

        name = pick_single_file_config(shapes, get_tensor, where=path)
        config_dir = os.path.join(CONFIGS_DIR, name)
        log.info("dreamflow: %s looks like %s", os.path.basename(path), name)
    index = read_model_index(config_dir)
    kind = detect_kind(index, config_dir)
    tok_dir = tokenizer_dir or clip_tokenizer_dir()
    tok_name = "tokenizer" if kind == "sd" else "tokenizer_2"
    # Special tokens (OpenCLIP pads with "!") come from the config folder; the BPE files from tok_dir.
    special = {}
    sp_path = os.path.join(config_dir, tok_name, "special_tokens_map.json")
    if os.path.isfile(sp_path):
        special = {k: v for k, v in read_json_object(sp_path, "tokenizer config", "re-download the model").items()
                   if isinstance(v, str)}
    tok = _load_guarded("the CLIP tokenizer", [tok_dir], lambda: CLIPTokenizer.from_pretrained(
        tok_dir, local_files_only=True, model_max_length=77, **special))
    kw = dict(config=config_dir, local_files_only=True, torch_dtype=dtype)
    if kind == "sd":
        cls = StableDiffusionPipeline
        kw.update(tokenizer=tok, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        cls = StableDiffusionXLImg2ImgPipeline
        kw.update(tokenizer_2=tok, tokenizer=None, text_encoder=None)
    pipe = _load_guarded("the single-file checkpoint", [path], lambda: cls.from_single_file(path, **kw))
    out = LoadedComponents(kind=kind, path=path, model_index=index, unet=pipe.unet, vae=pipe.vae,
                           scheduler_config=read_scheduler_config(config_dir), extras={"config_dir": config_dir})
    if kind == "sd":
        out.text_encoder, out.tokenizer = pipe.text_encoder, pipe.tokenizer
    else:
        out.text_encoder_2, out.tokenizer_2 = pipe.text_encoder_2, pipe.tokenizer_2
    if text_dtype is not None and text_dtype != dtype:
        for m in (out.text_encoder, out.text_encoder_2):
            if m is not None:
                m.to(text_dtype)
    if vae_dtype is not None and vae_dtype != dtype:
        out.vae.to(vae_dtype)
    return out


def load_components(path: str, dtype: Optional[torch.dtype] = None, text_dtype: Optional[torch.dtype] = None,
                    vae_dtype: Optional[torch.dtype] = None) -> LoadedComponents:
    """Load a resolved path: a diffusers folder or a single ``.safetensors`` file."""
    if os.path.isdir(path):
        return load_folder(path, dtype, text_dtype, vae_dtype)
    if not os.path.isfile(path):
        raise DreamFlowError(f"denoiser path '{path}' does not exist; check the name or path")
    return load_single_file(path, dtype, text_dtype, vae_dtype)
