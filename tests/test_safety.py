"""Safe files and bad input (issue: nothing unpickled, nothing half-written, every failure explained)."""

import os
import pickle

import pytest
import torch

from dreamflow.errors import DreamFlowError
from dreamflow.io import check_prefix, load_state_file, next_output_path, save_state_file
from dreamflow.state import MeshState, NeRFState, load_state


class _Payload:
    """Unpickling this runs ``open(marker, 'w')``: proof that a file was (not) unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Payload(marker)}, f)
    return path


@pytest.mark.parametrize("name", ["state.safetensors", "state.ckpt", "state.pt", "state.bin", "state.pth"])
def test_pickle_disguised_as_state_is_refused_unexecuted(tmp_path, name):
    marker = str(tmp_path / "pwned")
    path = _evil(str(tmp_path / name), marker)
    for loader in (NeRFState.load, MeshState.load, load_state):
        with pytest.raises(DreamFlowError) as e:
            loader(path)
        assert "\n" not in str(e.value)
    assert not os.path.exists(marker)


def test_pickle_checkpoint_and_bin_weights_are_refused_unexecuted(tmp_path, tiny_sd_path):
    import shutil

    from dreamflow.denoisers import Denoiser

    marker = str(tmp_path / "pwned")
    with pytest.raises(DreamFlowError, match="safetensors"):
        Denoiser.load(_evil(str(tmp_path / "model.ckpt"), marker))
    # a diffusers folder whose UNet weights are a pickle .bin
    folder = str(tmp_path / "evil-sd")
    shutil.copytree(tiny_sd_path, folder)
    unet = os.path.join(folder, "unet")
    for f in os.listdir(unet):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(unet, f))
    _evil(os.path.join(unet, "diffusion_pytorch_model.bin"), marker)
    with pytest.raises(DreamFlowError) as e:
        Denoiser.load(folder)
    assert "\n" not in str(e.value)
    assert not os.path.exists(marker)


def _state_file(tmp_path):
    path = str(tmp_path / "s.safetensors")
    save_state_file(path, {"a": torch.arange(6.0).view(2, 3)}, {"format": "dreamflow.nerf", "version": 1, "x": [1, 2]})
    return path


def test_state_round_trip_truncation_and_version(tmp_path):
    path = _state_file(tmp_path)
    tensors, header = load_state_file(path, "dreamflow.nerf", 1)
    assert torch.equal(tensors["a"], torch.arange(6.0).view(2, 3)) and header["x"] == [1, 2]
    with pytest.raises(DreamFlowError, match="version 1, this DreamFlow reads version 2"):
        load_state_file(path, "dreamflow.nerf", 2)
    with pytest.raises(DreamFlowError, match="'dreamflow.nerf' state but a 'dreamflow.mesh' state is needed"):
        load_state_file(path, "dreamflow.mesh", 1)
    data = open(path, "rb").read()
    cut = str(tmp_path / "cut.safetensors")
    with open(cut, "wb") as f:
        f.write(data[: len(data) - 10])
    with pytest.raises(DreamFlowError, match="truncated or corrupt"):
        load_state_file(cut, "dreamflow.nerf", 1)
    with pytest.raises(DreamFlowError, match="does not exist"):
        load_state_file(str(tmp_path / "nope.safetensors"), "dreamflow.nerf", 1)


def test_state_with_missing_or_mismatched_tensors_is_a_clear_error(tmp_path):
    from dreamflow.scene.hashgrid import HashGridConfig
    from dreamflow.scene.nerf import Background, NeRFField, NeRFFieldConfig

    st = NeRFState(field=NeRFField(NeRFFieldConfig(grid=HashGridConfig(n_levels=2, log2_hashmap_size=8, base_resolution=4))),
                   background=Background(), prompt="a cube")
    path = str(tmp_path / "n.safetensors")
    st.save(path)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors.pop("field.encoding.params")
    broken = str(tmp_path / "broken.safetensors")
    save_file(tensors, broken, metadata=meta)
    with pytest.raises(DreamFlowError, match="missing"):
        NeRFState.load(broken)
    tensors["field.encoding.params"] = torch.zeros(3)
    save_file(tensors, broken, metadata=meta)
    with pytest.raises(DreamFlowError, match="shape mismatch"):
        NeRFState.load(broken)


@pytest.mark.parametrize("prefix", ["../escape", "/abs/path", "a/../../b", "C:/windows", ""])
def test_unsafe_filename_prefixes_are_refused(prefix, tmp_path):
    with pytest.raises(DreamFlowError):
        check_prefix(prefix)
    with pytest.raises(DreamFlowError):
        next_output_path(prefix, "glb", str(tmp_path))


def test_output_paths_count_up_inside_the_output_folder(tmp_path):
    full, rel = next_output_path("dreamflow/corgi", "glb", str(tmp_path))
    assert rel == "dreamflow/corgi_00001_.glb" and full.startswith(str(tmp_path))
    open(full, "w").close()
    assert next_output_path("dreamflow/corgi", "glb", str(tmp_path))[1] == "dreamflow/corgi_00002_.glb"


def test_atomic_state_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    import safetensors.torch as st

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", boom)
    path = str(tmp_path / "s.safetensors")
    with pytest.raises(KeyboardInterrupt):
        save_state_file(path, {"a": torch.zeros(2)}, {"format": "f", "version": 1})
    assert os.listdir(tmp_path) == []


def test_cuda_out_of_memory_is_explained_with_settings_that_fit(tiny_sd, monkeypatch):
    from dreamflow.stages import NeRFStageConfig, run_nerf_stage

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr("dreamflow.stages.nerf_stage.render_volume", oom)
    cfg = NeRFStageConfig(iterations=2, views_per_update=8, resolution=256, denoise_resolution=16)
    with pytest.raises(DreamFlowError) as e:
        run_nerf_stage(tiny_sd, "a cube", "", cfg)
    msg = str(e.value)
    assert "out of GPU memory" in msg and "views_per_update=4" in msg and "resolution=128" in msg and "offload" in msg
