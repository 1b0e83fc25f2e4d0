import dataclasses
import json

import pytest
import torch

from ddpm.model import PRESETS, ModelConfig, UNet
from ddpm.model.io import CheckpointError, atomic_write, load_model, read_weights, save_model, weights_hash
from ddpm.model.unet import timestep_embedding
from helpers import slow_except

TINY = PRESETS["tiny"]


def _inputs(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 28, 28, generator=g), torch.tensor([0, 500, 999][:b]), torch.tensor([1, 5, 10][:b])


def _randomised(cfg=TINY, seed=0):
    torch.manual_seed(seed)
    m = UNet(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():   # zero-initialised output layers would hide t/y dependence
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_shapes_and_conditioning():
    m = _randomised()
    x, t, y = _inputs()
    with torch.no_grad():
        out = m(x, t, y)
        assert out.shape == x.shape and out.dtype == torch.float32
        assert not torch.allclose(out, m(x, t.flip(0), y))                  # t is used
        assert not torch.allclose(out, m(x, t, torch.full_like(y, 10)))     # y is used (10 = no label)


@pytest.mark.parametrize("name", slow_except(PRESETS, "tiny"))
def test_presets_build(name):
    cfg = PRESETS[name]
    assert cfg.null_label == cfg.num_classes == 10
    out = UNet(cfg).eval()(*_inputs(2))
    assert out.shape == (2, 1, 28, 28)


def test_timestep_embedding_is_float32_and_exact():
    t = torch.tensor([0, 999])
    e = timestep_embedding(t, 32)
    assert e.dtype == torch.float32
    assert torch.allclose(e[0], torch.cat([torch.zeros(16), torch.ones(16)]))
    assert e[1, 0].item() == pytest.approx(torch.sin(torch.tensor(999.0)).item(), abs=1e-6)
    m = _randomised().half()
    x, t, y = _inputs()
    assert m(x.half(), t, y).dtype == torch.float16   # the half model casts after the fp32 embedding


def test_config_roundtrip_and_validation():
    cfg = dataclasses.replace(TINY, schedule="cosine")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config"):
        ModelConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="GroupNorm"):
        ModelConfig(base_channels=10, groups=8).validate()


def test_safetensors_roundtrip_identical(tmp_path):
    m = _randomised()
    save_model(tmp_path / "model.safetensors", TINY, m.state_dict(), step=7)
    loaded = load_model(tmp_path)           # a folder resolves to model.safetensors
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded.model(x, t, y), m(x, t, y))
    assert loaded.cfg == TINY and loaded.info["step"] == 7
    assert loaded.hash == weights_hash(TINY, m.state_dict())
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o044   # readable by others, not mkstemp's 0600


def test_model_files_are_the_same_bytes_for_the_same_weights(tmp_path):
    """Writing the same weights, config and info again gives the same file, byte for byte (a checksum of two
    identical runs agrees): the metadata keys are sorted, not in a hash map's order. train writes step=, distill's
    students step= and plan=; five writes each, as one pair could agree by chance."""
    from safetensors import safe_open

    from ddpm.train.distill import recorded_plan

    state = _randomised().state_dict()
    plan = recorded_plan(2, {"guidance": 1.0, "guidance_interval": [0.28, 5.42], "teacher": "0" * 64,
                             "teacher_steps": 4})
    for name, info in (("model.safetensors", {"step": 7}), ("student2.safetensors", {"step": 9, "plan": plan})):
        files = []
        for k in range(5):
            save_model(tmp_path / f"{k}{name}", TINY, state, **info)
            files.append((tmp_path / f"{k}{name}").read_bytes())
        assert all(f == files[0] for f in files), name
        header = json.loads(files[0][8:8 + int.from_bytes(files[0][:8], "little")])
        assert list(header["__metadata__"]) == sorted({"format", "config", *info}), name
        with safe_open(str(tmp_path / f"0{name}"), "pt") as f:
            assert all(torch.equal(f.get_tensor(k), state[k]) for k in state) and set(f.keys()) == set(state)
    assert load_model(tmp_path / "0student2.safetensors").info["plan"] == plan


def test_foreign_and_missing_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"garbage" * 100)
    with pytest.raises(CheckpointError, match="not a readable"):
        load_model(tmp_path / "junk.pt")
    torch.save({"some": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a ddpm"):
        load_model(tmp_path / "other.pt")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a ddpm model"):
        read_weights(tmp_path / "other.safetensors")
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointError):
        read_weights(tmp_path / "trunc.safetensors")
    with pytest.raises(CheckpointError, match="holds neither"):
        load_model(tmp_path)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"old")

    def boom(tmp):
        open(tmp, "wb").write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(p, boom)
    assert p.read_bytes() == b"old" and list(tmp_path.iterdir()) == [p]
