"""`ddpm export --diffusers`: a model with the diffusers block, loaded back by diffusers' own classes, gives this
project's eps and schedule; anything else is refused in one line, and nothing is lost."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from ddpm.export import diffusers as dx
from ddpm.model.config import ModelConfig
from ddpm.runtime.schedule import Schedule
from helpers import TINY, LazyModule, invoke, randomised_unet, tiny_checkpoint

diffusers = LazyModule("diffusers")   # the `test` extra

BLOCK = dataclasses.replace(TINY, block="diffusers")   # 1x28x28, 8 channels (x1, x2), attention, 10 classes, T=100


def _their_eps(folder, x, t, y):
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False).eval()
    with torch.no_grad():
        return unet(x, t, class_labels=y).sample


def _inputs(cfg, n=8, seed=1):
    """n random x_t, t over 0..T-1 (both ends), labels over 0..num_classes-1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *cfg.image_shape, generator=g)
    t = torch.randint(0, cfg.timesteps, (n,), generator=g)
    t[0], t[-1] = 0, cfg.timesteps - 1
    return x, t, torch.randint(0, cfg.num_classes, (n,), generator=g)


@pytest.fixture(scope="module")
def block_ckpt(tmp_path_factory):
    """A run folder holding a tiny randomised model with the diffusers block."""
    root = tmp_path_factory.mktemp("block")
    tiny_checkpoint(root, seed=3, cfg=BLOCK)
    return root


@pytest.mark.parametrize("cfg", [BLOCK, dataclasses.replace(BLOCK, attention=False, num_res_blocks=2, prediction="v",
                                                             channel_mults=(1, 2, 2), image_size=32, in_channels=3)],
                         ids=["tiny", "no-attention-3x32x32"])
def test_diffusers_computes_the_same_eps(cfg, tmp_path):
    """UNet2DModel.from_pretrained of the written unet/ gives this network's eps within 1e-4, with labels (the
    class-conditional model) and with the null label (the unconditional one)."""
    net = randomised_unet(cfg, seed=2)
    dx._write(tmp_path, cfg, net, "hash")
    x, t, y = _inputs(cfg)
    null = torch.full_like(y, cfg.null_label)
    for labels in (y, null):
        with torch.no_grad():
            ours = net(x, t, labels)
        theirs = _their_eps(tmp_path, x, t, labels)
        assert (theirs - ours).abs().max().item() <= 1e-4
        assert ours.abs().mean() > 0.1   # a network whose output depends on its weights, not a zero-initialised one
    with torch.no_grad():   # and the labels matter: the comparison above would catch a lost class embedding
        assert (net(x, t, y) - net(x, t, null)).abs().max() > 1e-2


def test_the_ddpm_block_is_not_what_diffusers_computes(tmp_path):
    """Why a model with the ddpm block is refused: the same weights under the same names give diffusers another eps
    (ResnetBlock2D's SiLU on the embedding), far outside the tolerance."""
    net = randomised_unet(TINY, seed=2)
    dx._write(tmp_path, BLOCK, net, "hash")   # written as if it had the diffusers block
    x, t, y = _inputs(TINY)
    with torch.no_grad():
        ours = net(x, t, y)
    assert (_their_eps(tmp_path, x, t, y) - ours).abs().max().item() > 100 * dx.TOLERANCE
    with pytest.raises(dx.DiffusersExportError, match="computes another network"):
        dx.check_with_diffusers(tmp_path, net, TINY)


@pytest.mark.parametrize("schedule, T", [("linear", 1000), ("linear", 100), ("linear", 10), ("cosine", 1000),
                                         ("cosine", 50)])
def test_scheduler_config_gives_the_same_schedule(schedule, T):
    """DDPMScheduler made from the written config has this project's betas and abar_t (float32 in diffusers), the
    training T and the prediction type; T=10 is the linear schedule clipped at 0.999, written as its betas."""
    cfg = dataclasses.replace(BLOCK, schedule=schedule, timesteps=T)
    conf = dx.scheduler_config(cfg)
    theirs = diffusers.DDPMScheduler.from_config(conf)
    ours = Schedule.of(cfg)
    assert theirs.config.num_train_timesteps == T and theirs.config.prediction_type == "epsilon"
    np.testing.assert_allclose(theirs.betas.double().numpy(), ours.betas, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(theirs.alphas_cumprod.double().numpy(), ours.alphas_cumprod, rtol=2e-5, atol=1e-9)
    assert (conf["trained_betas"] is not None) == (schedule == "linear" and T == 10)
    v = dx.scheduler_config(dataclasses.replace(cfg, prediction="v"))
    assert diffusers.DDPMScheduler.from_config(v).config.prediction_type == "v_prediction"


def test_export_command_writes_a_pipeline_folder(block_ckpt, tmp_path):
    """`ddpm export --diffusers DIR`: the folder diffusers' loaders read, checked with diffusers on the way, its
    record of what was written; run again, it replaces its own folder."""
    out = tmp_path / "pipe"
    r = invoke("export", "--ckpt", block_ckpt, "--diffusers", out)
    assert r.exit_code == 0, r.output
    assert "checked with diffusers" in r.output and f"diffusers folder: {out}" in r.output
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    record = json.loads((out / dx.MARKER).read_text())
    assert ModelConfig.from_dict(record["model_config"]) == BLOCK and set(record["files"]) == set(dx.FILES) - {dx.MARKER}
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    assert pipe.scheduler.config.num_train_timesteps == BLOCK.timesteps
    x, t, y = _inputs(BLOCK)
    net = randomised_unet(BLOCK, seed=3)
    with torch.no_grad():
        assert (pipe.unet(x, t, class_labels=y).sample - net(x, t, y)).abs().max().item() <= 1e-4
    again = invoke("export", "--ckpt", block_ckpt, "--diffusers", out)
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]   # no temporaries left beside it


def test_an_exported_folder_loads_back_with_the_same_digits(block_ckpt, tmp_path):
    """The round trip: `ddpm export --diffusers DIR`, then `ddpm.load(DIR)` (model/diffusers.py: diffusers' own
    UNet2DModel, the null class from the ddpm.json the export wrote) draws the digits of the checkpoint itself, the
    same seed and labels, guided (so the null class is used), within 1 grey level (the two networks' eps agree within
    1e-4, not bit for bit)."""
    import ddpm

    out = tmp_path / "pipe"
    assert invoke("export", "--ckpt", block_ckpt, "--diffusers", out).exit_code == 0
    kw = dict(label=[0, 3, 7, 9], seed=5, steps=4, guidance=1.5, engine="torch")
    ours = ddpm.load(block_ckpt).generate(4, **kw)
    back = ddpm.load(out)
    assert back.cfg.network == "diffusers" and back.cfg.null_label == BLOCK.null_label
    theirs = back.generate(4, **kw)
    assert ours.shape == theirs.shape and np.abs(ours.astype(int) - theirs).max() <= 1
    assert ours.std() > 10   # digits drawn by a network whose output depends on its weights


def test_the_shipped_model_is_refused_in_one_line(tmp_path):
    r = invoke("export", "--diffusers", tmp_path / "pipe")
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and r.output.startswith("Error: ")
    assert "SiLU" in r.output and "--block diffusers" in r.output
    assert not (tmp_path / "pipe").exists()


def test_a_folder_it_did_not_write_is_kept(block_ckpt, tmp_path):
    """An existing folder is replaced only when it holds nothing but what `ddpm export --diffusers` writes."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    r = invoke("export", "--ckpt", block_ckpt, "--diffusers", theirs)
    assert r.exit_code == 1 and "is not a folder written by `ddpm export --diffusers`" in r.output
    assert r.output.count("\n") == 1 and (theirs / "notes.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    assert invoke("export", "--ckpt", block_ckpt, "--diffusers", ours).exit_code == 0
    (ours / "README.md").write_text("a model card")
    r = invoke("export", "--ckpt", block_ckpt, "--diffusers", ours)
    assert r.exit_code == 1 and "README.md" in r.output and (ours / "README.md").read_text() == "a model card"


def test_diffusers_takes_no_onnx_options(block_ckpt, tmp_path):
    r = invoke("export", "--ckpt", block_ckpt, "--diffusers", tmp_path / "pipe", "--fp16", "--trt")
    assert r.exit_code == 2 and "--fp16, --trt" in r.output and not (tmp_path / "pipe").exists()
    r = invoke("export", "--ckpt", block_ckpt, "--diffusers", block_ckpt)
    assert r.exit_code == 2 and "same folder" in r.output


def test_block_field_keeps_existing_models_identical():
    """The ddpm block is the absence of the field: configs, hashes and exports of existing models are unchanged."""
    assert "block" not in TINY.to_dict() and ModelConfig.from_dict(TINY.to_dict()) == TINY
    assert BLOCK.to_dict()["block"] == "diffusers" and ModelConfig.from_dict(BLOCK.to_dict()) == BLOCK
    with pytest.raises(ValueError, match="block"):
        dataclasses.replace(TINY, block="other").validate()
    with pytest.raises(dx.DiffusersExportError, match="channel_mults start with 1"):
        dx.check_exportable(dataclasses.replace(BLOCK, channel_mults=(2, 2)))


def test_train_block_option(fake_mnist, tmp_path, small_sample_grids):
    """`ddpm train --block diffusers` trains a model with that block (recorded in its files); --resume keeps it and
    refuses another; --init may switch it (fine-tuning, as for --prediction)."""
    from ddpm.model.io import read_model_info

    run = tmp_path / "run"
    common = ("--data", fake_mnist, "--preset", "tiny", "--timesteps", 50, "--batch", 8, "--warmup", 0,
              "--device", "cpu")
    r = invoke("train", *common, "--block", "diffusers", "--steps", 2, "--ckpt-every", 2, "--out", run)
    assert r.exit_code == 0, r.output
    assert read_model_info(run)[0].block == "diffusers"
    assert json.loads((run / "options.json").read_text())["block"] == "diffusers"
    r = invoke("train", "--out", run, "--resume", "--steps", 3, "--block", "ddpm", "--data", fake_mnist)
    assert r.exit_code == 1 and "not --block ddpm" in r.output and r.output.count("\n") == 1
    r = invoke("train", *common, "--init", run, "--block", "ddpm", "--steps", 1, "--out", tmp_path / "back")
    assert r.exit_code == 0, r.output
    assert read_model_info(tmp_path / "back")[0].block == "ddpm"
