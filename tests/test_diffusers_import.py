"""A diffusers folder deployed with this toolkit (model/diffusers.py), against diffusers' own schedulers.

Tiny random UNet2DModels saved by `save_pretrained` (1x28x28 unconditional, 1x28x28 class-conditional with a
declared null class, 3x32x32 unconditional) are loaded with `ddpm.load`; the runtime's DDIM (eta 0) and DDPM (the
same noise fed to both) must give the images of diffusers' DDIMScheduler / DDPMScheduler loops run on the same
UNet from the same x_T, on every CPU engine. Measured (diffusers 0.42.1, torch 2.13 CPU, onnxruntime 1.32; T = 100,
DDIM-10 trailing; T = 20 for DDPM; these cases with their differences printed): DDIM max abs difference 1.7e-6 over the
three models, guided and not, on torch, runtime-torch and onnx (x in [-1, 1]); DDPM 6.9e-6 (6.9e-5 at T = 100);
the generator's uint8 images equal diffusers' rounded ones. The tolerances below (1e-5 DDIM, 1e-4 DDPM, 1 grey
level for the generator) are those figures with a margin for other CPUs' float32 kernels.

diffusers' DDIM is run with use_clipped_model_output=True: with clip_sample (its default) it then steps with the noise
consistent with the clipped x0_hat, as the runtime does (runtime.samplers.ddim_plan); DDIMPipeline's default steps
with the unclipped eps instead, which differs wherever the clip acts. The grid is "trailing": diffusers' DDIM steps
from t to t - T/steps, which is the next grid point for trailing (and leading) spacing but not for linspace.
"""

import json
import os
import shutil
import sys
from unittest import mock

import numpy as np
import pytest
import torch

import ddpm
from ddpm.errors import DdpmError
from ddpm.export.cache import cache_folder
from ddpm.model.diffusers import DiffusersMissing
from ddpm.model.io import default_model_path, load_model, read_model_info
from ddpm.runtime.bundle import META_FILE, Bundle, ExportError
from ddpm.runtime.schedule import Schedule
from helpers import LazyModule, invoke, slow_except

diffusers = LazyModule("diffusers")   # the `test` extra

T, STEPS, DDPM_T, B = 100, 10, 20, 3
DDIM_TOL, DDPM_TOL, GREY_TOL = 1e-5, 1e-4, 1
KINDS = {"uncond28": ((1, 28, 28), None), "cond28": ((1, 28, 28), 11), "rgb32": ((3, 32, 32), None)}


def tiny_unet(shape, classes=None, seed=0) -> "diffusers.UNet2DModel":
    """A UNet2DModel of (8, 16) channels whose weights are perturbed, so that t and y visibly matter."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=shape[1], in_channels=shape[0], out_channels=shape[0], block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=4, attention_head_dim=8, num_class_embeds=classes,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet.eval()


def save(folder, unet, **scheduler):
    """A DDPMPipeline folder of `unet` with a DDPMScheduler of these settings (T by default); a class-conditional
    one declares its last class as the null class (ddpm.json)."""
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**{"num_train_timesteps": T, **scheduler})).save_pretrained(folder)
    if unet.config.num_class_embeds:
        (folder / "ddpm.json").write_text(json.dumps({"null_class": unet.config.num_class_embeds - 1}))
    return folder


def variant(src, dst, unet_config=None, **scheduler):
    """A copy of the folder `src` with these scheduler config (and unet config) entries changed (None: removed)."""
    shutil.copytree(src, dst)
    for path, changes in ((dst / "scheduler" / "scheduler_config.json", scheduler),
                          (dst / "unet" / "config.json", unet_config or {})):
        d = json.loads(path.read_text())
        d.update(changes)
        path.write_text(json.dumps({k: v for k, v in d.items() if v is not None}))
    return dst


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers")
    return {kind: save(root / kind, tiny_unet(shape, classes)) for kind, (shape, classes) in KINDS.items()}


@pytest.fixture(scope="module")
def ddpm_folders(folders, tmp_path_factory):
    """The same networks with T = DDPM_T, so that DDPM's T steps take a second."""
    root = tmp_path_factory.mktemp("diffusers_ddpm")
    return {kind: variant(f, root / kind, num_train_timesteps=DDPM_T) for kind, f in folders.items()}


def inputs(model, seed=0):
    rng = np.random.default_rng(seed)
    x_T = rng.standard_normal((B, *model.image_shape)).astype(np.float32)
    labels = np.array([0, 3, 7])[:B] if model.cfg.num_classes > 1 else np.zeros(B, np.int64)
    return x_T, labels


def unet_eps(unet, x, t, labels, guidance=0.0):
    """diffusers' UNet at (x, t), with classifier-free guidance over the null class when w > 0."""
    if not unet.config.num_class_embeds:
        return unet(x, t).sample
    y = torch.from_numpy(labels)
    cond = unet(x, t, class_labels=y).sample
    if not guidance:
        return cond
    uncond = unet(x, t, class_labels=torch.full_like(y, unet.config.num_class_embeds - 1)).sample
    return cond + guidance * (cond - uncond)


def diffusers_ddim(folder, x_T, labels, guidance=0.0):
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    sched = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler", timestep_spacing="trailing")
    sched.set_timesteps(STEPS)
    x = torch.from_numpy(x_T)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet_eps(unet, x, t, labels, guidance), t, x, eta=0.0,
                           use_clipped_model_output=True).prev_sample
    return sched.timesteps.numpy(), x.numpy()


def engines(kind):
    return ["torch", "onnx", "onnx-generator"]


# the inner loop: the 3-channel model and the guided class-conditional one on the torch engine (the unconditional
# 1x28x28 model's DDIM is in the inner loop by test_schedule_recipes_reach_the_runtime, and so is a diffusers
# model's onnx engine; each first use of a model's onnx engine exports it to the cache)
@pytest.mark.parametrize("kind, engine, guidance", slow_except(
    [(k, e, 0.0) for k in KINDS for e in engines(k)] + [("cond28", e, 1.5) for e in engines("cond28")],
    ("rgb32", "torch", 0.0), ("cond28", "torch", 1.5)))
def test_ddim_gives_diffusers_images(folders, kind, engine, guidance):
    model = ddpm.load(folders[kind])
    x_T, labels = inputs(model)
    want_t, want = diffusers_ddim(folders[kind], x_T, labels, guidance)
    plan = model.plan("ddim", STEPS, spacing="trailing", guidance_interval=None)
    assert np.array_equal(plan.timesteps, want_t)
    got = model.engine(engine, plan=plan).run(x_T, None, labels, plan, guidance)
    if engine == "onnx-generator":   # uint8 pictures, white = +1, channels last (runtime.images)
        levels = np.moveaxis(np.clip(np.round((want + 1) * 127.5), 0, 255), 1, -1)
        assert np.abs(got.astype(int) - (levels[..., 0] if levels.shape[-1] == 1 else levels)).max() <= GREY_TOL
    else:
        assert np.abs(got - want).max() < DDIM_TOL


@pytest.mark.parametrize("kind, engine", slow_except([(k, e) for k in KINDS for e in ("torch", "onnx")],
                                                     ("cond28", "torch")))   # the DDPM noise slots: once
def test_ddpm_with_the_same_noise_gives_diffusers_images(ddpm_folders, kind, engine):
    """diffusers' DDPMScheduler draws its noise with randn_tensor: it is handed the runtime's z, slot by slot (the
    runtime's row i adds slot i; the last row, t = 0, none)."""
    folder = ddpm_folders[kind]
    model = ddpm.load(folder)
    x_T, labels = inputs(model)
    plan = model.plan("ddpm", guidance_interval=None)
    z = np.random.default_rng(1).standard_normal((B, plan.num_slots, *model.image_shape)).astype(np.float32)
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    sched = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler")
    sched.set_timesteps(DDPM_T)
    assert np.array_equal(sched.timesteps.numpy(), plan.timesteps)
    slots = iter(range(plan.num_slots))
    x = torch.from_numpy(x_T)
    with mock.patch.object(diffusers.schedulers.scheduling_ddpm, "randn_tensor", lambda *a, **k: torch.from_numpy(z[:, next(slots)])), \
            torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet_eps(unet, x, t, labels), t, x).prev_sample
    assert next(slots, None) is None   # every slot used
    got = model.engine(engine).run(x_T, z, labels, plan, 0.0)
    assert np.abs(got - x.numpy()).max() < DDPM_TOL


RECIPES = {"scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
           "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
           "linear_range": dict(beta_start=0.001, beta_end=0.05),
           "trained_betas": dict(trained_betas=np.linspace(2e-4, 0.04, T).tolist()),
           "v_prediction": dict(prediction_type="v_prediction")}


# In the loop: scaled_linear and v_prediction. Left to the full run: linear_range, the default beta_schedule (linear)
# at other ends, the path of every model above; squaredcos_cap_v2, whose cosine table test_schedule.py checks;
# trained_betas, an ONNX export of its own (the loop exports diffusers models in test_export_json_checks_the_recipe
# and test_editing_and_the_cli_run_a_diffusers_model, and refuses a bad table below)
@pytest.mark.parametrize("recipe", slow_except(list(RECIPES), "scaled_linear", "v_prediction"))
def test_schedule_recipes_reach_the_runtime(folders, tmp_path, recipe):
    """Every beta recipe and prediction type diffusers' schedulers have and the runtime follows: the same abar
    table as diffusers' and the same DDIM images (on the onnx engine for the table schedule, whose export.json
    carries and checks the table). diffusers keeps the tables in float32: 1 - beta there is off by up to 1.3e-5
    relative where beta is clipped at 0.999 (squaredcos_cap_v2's last step), hence rtol 1e-4."""
    folder = variant(folders["uncond28"], tmp_path / recipe, **RECIPES[recipe])
    model = ddpm.load(folder)
    theirs = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler").alphas_cumprod.numpy()
    assert np.allclose(model.schedule.alphas_cumprod, theirs, rtol=1e-4, atol=0)
    x_T, labels = inputs(model)
    _, want = diffusers_ddim(folder, x_T, labels)
    plan = model.plan("ddim", STEPS, spacing="trailing", guidance_interval=None)
    engine = "onnx" if recipe == "trained_betas" else "torch"
    assert np.abs(model.engine(engine).run(x_T, None, labels, plan, 0.0) - want).max() < DDIM_TOL
    if engine == "onnx":
        assert Bundle.load(model.bundle().root).schedule.betas.tolist() == model.schedule.betas.tolist()


REFUSED = [("clip_sample", False), ("clip_sample_range", 2.0), ("thresholding", True),
           ("rescale_betas_zero_snr", True), ("set_alpha_to_one", False), ("variance_type", "learned_range"),
           ("timestep_spacing", "karras"), ("steps_offset", 1), ("prediction_type", "sample"),
           ("beta_schedule", "sigmoid"), ("num_train_timesteps", 1), ("beta_end", 1.5), ("trained_betas", [0.1, 0.2]),
           ("use_karras_sigmas", True)]


@pytest.mark.parametrize("field, value", REFUSED, ids=[f for f, _ in REFUSED])
def test_a_scheduler_config_the_runtime_cannot_follow_is_one_line(folders, tmp_path, field, value):
    folder = variant(folders["uncond28"], tmp_path / "f", **{field: value})
    with pytest.raises(DdpmError) as e:
        ddpm.load(folder)
    assert field in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("scheduler", [dict(num_train_timesteps=100000), dict(num_train_timesteps=3000, trained_betas=[0.3] * 3000)])
def test_a_schedule_whose_abar_underflows_is_one_line(folders, tmp_path, scheduler):
    """Betas in (0, 1) and T in 2..100000 whose abar_T underflows (diffusers' default betas 1e-4 .. 0.02 over T =
    100000, which it does not rescale): the plans' coefficients were inf, a ValueError traceback from the CLI and
    not a DdpmError from the API. One line naming the scheduler config, from both."""
    folder = variant(folders["uncond28"], tmp_path / "f", **scheduler)
    with pytest.raises(DdpmError, match="scheduler_config.json: the schedule's abar_T .* below 1e-30"):
        ddpm.load(folder)
    result = invoke("gen", "--ckpt", folder, "-n", 1, "--uncond", "--engine", "torch", "--out", tmp_path / "x.png")
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "below 1e-30" in result.output, \
        result.output


UNET_REFUSED = [("out_channels", 2), ("time_embedding_type", "fourier"), ("class_embed_type", "timestep"),
                ("sample_size", [28, 32])]


@pytest.mark.parametrize("field, value", UNET_REFUSED, ids=[f for f, _ in UNET_REFUSED])
def test_a_unet_config_the_runtime_cannot_follow_is_one_line(folders, tmp_path, field, value):
    folder = variant(folders["uncond28"], tmp_path / "f", unet_config={field: value})
    result = invoke("gen", "--ckpt", folder, "-n", 1, "--out", tmp_path / "x.png")
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and field in result.output and result.output.count("\n") == 1


@pytest.mark.parametrize("index", [{"vqvae": ["diffusers", "VQModel"]}, {"_class_name": "LDMPipeline"},
                                   {"_class_name": "ScoreSdeVePipeline"}], ids=["vqvae", "ldm", "other-pipeline"])
def test_a_latent_or_other_pipeline_is_one_line(folders, tmp_path, index):
    """A pipeline whose unet is a UNet2DModel but which is not a pixel-space DDPM/DDIM pipeline (LDMPipeline denoises
    latents of its vqvae) is refused, not drawn as if its latents were pictures."""
    folder = tmp_path / "pipe"
    shutil.copytree(folders["uncond28"], folder)
    meta = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**meta, **index}))
    result = invoke("gen", "--ckpt", folder, "-n", 1, "--out", tmp_path / "x.png")
    assert result.exit_code == 1 and result.output.startswith("Error: ") and result.output.count("\n") == 1, \
        result.output
    assert "DDPMPipeline or DDIMPipeline" in result.output and not (tmp_path / "x.png").exists()


def test_guidance_needs_a_declared_null_class(folders, tmp_path):
    """A class-conditional model loads only with its null class declared (the last index, in ddpm.json): ddpm's
    labels are then 0..K-2 and its null label K-1, diffusers' own indices."""
    folder = tmp_path / "cond"
    shutil.copytree(folders["cond28"], folder)
    assert ddpm.load(folder).null_label == 10 and ddpm.load(folder).cfg.num_classes == 10
    (folder / "ddpm.json").unlink()
    with pytest.raises(DdpmError, match="null class.*ddpm.json"):
        ddpm.load(folder)
    (folder / "ddpm.json").write_text('{"null_class": 3}')
    with pytest.raises(DdpmError, match="null_class must be the last class index 10"):
        ddpm.load(folder)


def test_a_bare_unet_folder_takes_the_scheduler_beside_it_else_ddpm_defaults(folders, tmp_path, capsys):
    folder = tmp_path / "pipe"
    shutil.copytree(folders["uncond28"], folder)
    beside = ddpm.load(folder / "unet")
    assert beside.cfg.timesteps == T and beside.hash == ddpm.load(folder).hash
    assert "schedule from" in capsys.readouterr().err
    shutil.rmtree(folder / "scheduler")
    alone = ddpm.load(folder / "unet")
    assert alone.cfg.timesteps == 1000 and alone.cfg.beta_range == (1e-4, 0.02) and alone.hash != beside.hash
    assert capsys.readouterr().err.count("DDPMScheduler defaults") == 1


def test_a_folders_own_scheduler_is_read_without_a_notice(folders, tmp_path, capsys):
    """A pipeline folder's own scheduler config (here diffusers' default "leading" spacing, which ddpm does not
    sample on: docs/diffusers.md) is what the user gave: loading it says nothing, in every command. Only a schedule
    that did not come from the folder given is noticed (the bare unet folder's above)."""
    folder = variant(folders["uncond28"], tmp_path / "pipe", timestep_spacing="leading")
    capsys.readouterr()
    assert ddpm.load(folder).cfg.timesteps == T and ddpm.load(folder / "unet").cfg.timesteps == T
    err = capsys.readouterr().err
    assert err.count("ddpm: ") == 1 and f"{folder / 'unet'}: schedule from" in err and "spacing" not in err, err


def test_a_bare_unet_folder_takes_every_companion_from_its_pipeline(folders, tmp_path):
    """pipe/unet reads pipe/ddpm.json as it reads pipe/scheduler/: a class-conditional pipeline's unet folder loads
    with the null class its pipeline declares (it was refused for want of one), the same model as the pipeline."""
    folder = tmp_path / "pipe"
    shutil.copytree(folders["cond28"], folder)
    unet = ddpm.load(folder / "unet")
    assert unet.null_label == 10 and unet.hash == ddpm.load(folder).hash
    (folder / "unet" / "ddpm.json").write_text('{"null_class": 3}')   # the folder's own comes first
    with pytest.raises(DdpmError, match="unet/ddpm.json: null_class must be the last class index 10"):
        ddpm.load(folder / "unet")


@pytest.mark.parametrize("content, message", [
    ({"null_class": True}, "null_class must be an integer >= 0, got True"),
    ({"null_class": 10.0}, "null_class must be an integer >= 0, got 10.0"),
    ({"null_class": "10"}, "null_class must be an integer >= 0, got '10'"),
    ({"null_class": 10, "nul_class": 10}, "unknown field(s) nul_class"),
])
def test_ddpm_json_is_checked_against_its_schema(folders, tmp_path, content, message):
    """ddpm.json's null class is an integer (not a bool, not 10.0, which equals 10), and a field it does not hold is
    refused; what `ddpm export --diffusers` records beside it is not read (docs/diffusers.md)."""
    folder = tmp_path / "pipe"
    shutil.copytree(folders["cond28"], folder)
    (folder / "ddpm.json").write_text(json.dumps(content))
    result = invoke("gen", "--ckpt", folder, "-n", 1, "--out", tmp_path / "x.png")
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"Error: {folder / 'ddpm.json'}: ") and message in result.output, result.output


def test_pickled_weights_are_not_read(folders, tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(folders["uncond28"], folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").rename(folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(DdpmError, match="safetensors only"):
        ddpm.load(folder)


def test_without_diffusers_one_line_names_the_install(folders, monkeypatch):
    model = ddpm.load(folders["uncond28"])   # configs and weights' identity: numpy alone
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(DiffusersMissing, match="pip install diffusers"):
        load_model(folders["uncond28"])
    with pytest.raises(DdpmError, match="pip install diffusers"):
        model.generate(1, engine="torch")


def test_the_export_cache_keeps_each_diffusers_model_apart(folders, tmp_path):
    """Cache folders are named by the hash: a diffusers folder's covers its schedule, so the same UNet with another
    scheduler config is another export, and none is the shipped model's."""
    other = variant(folders["uncond28"], tmp_path / "v", prediction_type="v_prediction")
    hashes = {read_model_info(p)[1] for p in (default_model_path(), folders["uncond28"], other)}
    assert len({cache_folder(h) for h in hashes}) == 3


def test_export_json_checks_the_recipe(folders, tmp_path):
    """An export.json whose config names another beta range than its tables is a damaged folder."""
    src = ddpm.load(folders["uncond28"]).bundle().root
    folder = tmp_path / "export"
    shutil.copytree(src, folder)
    meta = json.loads((folder / META_FILE).read_text())
    meta["model_config"]["beta_range"] = [0.0001, 0.03]
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="betas is not the linear schedule's"):
        Bundle.load(folder)


def test_configs_of_ddpm_models_keep_their_form():
    """The recipe fields are left out of a ddpm model's config at their defaults: its stored form and hash stay."""
    cfg = read_model_info(default_model_path())[0]
    assert not {"beta_range", "betas", "network"} & set(cfg.to_dict())
    assert Schedule.of(cfg).betas.tolist() == Schedule.make("linear", 1000).betas.tolist()


def test_editing_and_the_cli_run_a_diffusers_model(folders, tmp_path):
    model = ddpm.load(folders["uncond28"])
    picture = model.generate(1, uncond=True, sampler="ddim", steps=4, engine="onnx")[0]
    filled = model.inpaint(picture, mask="bottom", n=2, steps=4, engine="onnx")
    assert filled.shape == (2, 28, 28) and np.array_equal(filled[:, :14], np.repeat(picture[None, :14], 2, 0))
    result = invoke("gen", "--ckpt", folders["uncond28"], "-n", 2, "--uncond", "--engine", "onnx", "--sampler",
                    "ddim", "--steps", 4, "--out", tmp_path / "x.npz")
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_export_writes_a_diffusers_models_generator(folders, tmp_path):
    """`ddpm export --generator` (what the web page runs) on a diffusers folder: the folder loads with its hash."""
    out = tmp_path / "export"
    result = invoke("export", "--ckpt", folders["cond28"], "--out", out, "--generator", "--sampler", "ddim",
                    "--steps", 4)
    assert result.exit_code == 0, result.output
    bundle = Bundle.load(out, expected_hash=ddpm.load(folders["cond28"]).hash)
    assert bundle.generators and bundle.null_label == 10 and bundle.config.network == "diffusers"


def test_a_config_declaring_a_huge_network_is_refused_before_it_is_built(folders, tmp_path):
    """The parameters a unet config declares are counted on the meta device (no memory) and bounded by MAX_PARAMS
    before the network is built: a small folder must not take GBs of memory."""
    folder = variant(folders["uncond28"], tmp_path / "f", unet_config={"block_out_channels": [16384, 32768]})
    with mock.patch.object(diffusers.UNet2DModel, "load_state_dict", side_effect=AssertionError("the network was built")):
        with pytest.raises(DdpmError, match=r"declares a UNet2DModel of [\d,]+ parameters, more than the "
                                            r"268,435,456") as e:
            load_model(folder)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("field, value", [("layers_per_block", 100000), ("block_out_channels", [8] * 40)])
def test_a_config_declaring_a_deep_network_is_refused_before_it_is_built(folders, tmp_path, field, value):
    """Depth is bounded from the config alone (building 100000 layers takes hours even on the meta device)."""
    folder = variant(folders["uncond28"], tmp_path / "f", unet_config={field: value})
    with pytest.raises(DdpmError, match=f"{field} is .*, not a") as e:
        read_model_info(folder)
    assert "\n" not in str(e.value)


def test_weights_beyond_the_limit_are_refused_from_the_header(folders, tmp_path, monkeypatch):
    """The weights file's tensor shapes (its safetensors header) are bounded before any tensor is read."""
    from ddpm.model import diffusers as dmod

    monkeypatch.setattr(dmod, "MAX_PARAMS", 1000)
    with pytest.raises(DdpmError, match=r"holds [\d,]+ weights, more than the 1,000 parameters"):
        read_model_info(folders["uncond28"])


def _fifo(path):
    path.unlink() if path.is_file() else shutil.rmtree(path)
    os.mkfifo(path)


def _folder(path):
    path.unlink()
    path.mkdir()


def _dangling(path):
    path.unlink()
    path.symlink_to(path.parent / "nowhere")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
@pytest.mark.parametrize("what, make", [("a pipe", _fifo), ("a folder", _folder), ("which does not exist", _dangling)],
                         ids=["pipe", "folder", "dangling"])
@pytest.mark.parametrize("file", ["model_index.json", "unet/config.json", "scheduler/scheduler_config.json",
                                  "ddpm.json", "unet/diffusion_pytorch_model.safetensors"])
def test_a_file_of_the_folder_that_is_not_a_file_is_named_in_one_line(folders, tmp_path, file, what, make):
    """Every file the reader reads goes through files.input_path: a pipe is never opened (it hung), and a folder, a
    pipe or a dangling link is named as what it is (a scheduler config that was a folder was taken as missing, the
    DDPM defaults used silently); a model_index.json that is not a file keeps the folder a diffusers folder."""
    folder = tmp_path / "pipe"
    shutil.copytree(folders["cond28"], folder)
    make(folder / file)
    result = invoke("gen", "--ckpt", folder, "-n", 1, "--out", tmp_path / "x.png")
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"Error: {folder / file} is") and what in result.output, result.output
    assert not (tmp_path / "x.png").exists()


def test_export_diffusers_of_a_diffusers_folder_says_it_already_is_one(folders, tmp_path):
    result = invoke("export", "--ckpt", folders["uncond28"], "--diffusers", tmp_path / "out")
    error = [line for line in result.output.splitlines() if not line.startswith("ddpm: ")]   # but the notice line
    assert result.exit_code == 1 and len(error) == 1 and error[0].startswith("Error: "), result.output
    assert "read from a diffusers folder: nothing to export" in result.output and "SiLU" not in result.output
    assert not (tmp_path / "out").exists()
