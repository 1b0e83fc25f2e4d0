"""Models of another image size or channel count: tiny 1x32x32 and 3x32x32 models (model/config.py's tiny preset at
another size) through ONNX export, every CPU engine, a grid picture, a samples file and the edits. The image shape
comes from the model's config everywhere; training stays MNIST-only.

Pictures are uint8 (N, H, W) for one channel and (N, H, W, C) for three (channels last, as Pillow and PNG hold
them: runtime/images.py's convention); grids and single pictures are written as greyscale or RGB PNGs.
"""

import dataclasses
import re

import numpy as np
import onnx
import pytest
from PIL import Image

import ddpm
from ddpm.export.onnx_export import export
from ddpm.runtime.bundle import Bundle
from ddpm.runtime.engines import make_engine
from ddpm.runtime.images import to_uint8
from ddpm.runtime.noise import make_noise
from ddpm.runtime.samplers import ddim_plan
from ddpm.runtime.schedule import Schedule
from helpers import TINY, invoke, slow_except, tiny_checkpoint

SHAPES = {"1x32x32": dataclasses.replace(TINY, image_size=32),
          "3x32x32": dataclasses.replace(TINY, image_size=32, in_channels=3)}
ENGINES = ("torch", "runtime-torch", "onnx", "onnx-generator")

# the colour model in the inner loop (`-m "not slow"`), the 1x32x32 one outside it (1x28x28 runs everywhere else)
COLOUR_FAST = pytest.mark.parametrize("exported", slow_except(list(SHAPES), "3x32x32"), indirect=True)


def _pictures(cfg, n):
    """The shape of n pictures of a model: (n, H, W) for one channel, (n, H, W, C) for more."""
    c, h, w = cfg.image_shape
    return (n, h, w) if c == 1 else (n, h, w, c)


@pytest.fixture(scope="module", params=list(SHAPES))
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"shape-{request.param}")
    loaded = tiny_checkpoint(root, cfg=SHAPES[request.param])
    return loaded, export(loaded, root / "exp", log=lambda *_: None).out


def test_config_names_the_image_shape():
    from ddpm.model import PRESETS

    assert PRESETS["small"].image_shape == (1, 28, 28)
    assert SHAPES["3x32x32"].validate().image_shape == (3, 32, 32)


def test_export_is_verified_at_the_models_shape(exported):
    """The ONNX model takes and gives (batch, C, H, W) of the model, and export verified it against PyTorch at that
    shape (verify draws its inputs at the model's shape: at 1x28x28 onnxruntime refuses a 32x32 model)."""
    loaded, out = exported
    bundle = Bundle.load(out, expected_hash=loaded.hash)
    assert bundle.image_shape == loaded.cfg.image_shape
    graph = onnx.load(str(out / "model.onnx")).graph
    for value in (graph.input[0], graph.output[0]):
        assert [d.dim_value for d in value.type.tensor_type.shape.dim[1:]] == list(loaded.cfg.image_shape)


def test_every_cpu_engine_runs_the_models_shape(exported):
    """x_0 in the model's space, (B, C, H, W), from the same x_T: torch, runtime-torch and onnx agree to fp32
    rounding, whatever the shape."""
    loaded, out = exported
    bundle = Bundle.load(out)
    plan = ddim_plan(Schedule.of(loaded.cfg), 3)
    x_T, _ = make_noise(0, 0, 2, plan.num_slots, loaded.cfg.image_shape)
    y = np.array([1, 2])
    outs = {name: np.asarray(make_engine(name, device="cpu", model=loaded.model, null_label=loaded.cfg.null_label,
                                         bundle=bundle)
                             .run(x_T, None, y, plan, 1.0))
            for name in ("torch", "runtime-torch", "onnx")}
    for name, x in outs.items():
        assert x.shape == (2, *loaded.cfg.image_shape), name
        assert np.abs(x - outs["torch"]).max() < 1e-3, name
    assert outs["torch"].std() > 0.05                             # not a constant picture


@COLOUR_FAST
def test_generator_engine_runs_the_models_shape(exported):
    """generator.onnx for the model's shape gives the runtime's pictures (within one grey level)."""
    from ddpm.export.generator import add_generator

    loaded, out = exported
    plan = ddim_plan(Schedule.of(loaded.cfg), 3)
    add_generator(out, plan, 1.0, log=lambda *_: None)
    bundle = Bundle.load(out)
    x_T, _ = make_noise(0, 0, 2, plan.num_slots, loaded.cfg.image_shape)
    y = np.array([1, 2])
    got = make_engine("onnx-generator", device="cpu", bundle=bundle, plan=plan).run(x_T, None, y, plan, 1.0)
    want = to_uint8(make_engine("onnx", device="cpu", bundle=bundle).run(x_T, None, y, plan, 1.0))
    assert got.shape == _pictures(loaded.cfg, 2)
    assert np.abs(got.astype(int) - want).max() <= 1


@COLOUR_FAST
@pytest.mark.parametrize("engine", ENGINES)
def test_generate_gives_pictures_at_the_models_size(exported, engine):
    """ddpm.load(path).generate with every CPU engine: pictures at the model's size, the same on every engine
    (within one grey level of the eager reference)."""
    loaded, _ = exported
    model = ddpm.load(loaded.path)
    kw = dict(sampler="ddim", steps=3, seed=1)
    images = model.generate(3, engine=engine, **kw)
    assert images.shape == _pictures(loaded.cfg, 3) and images.dtype == np.uint8
    reference = model.generate(3, engine="torch", **kw)
    assert np.abs(images.astype(int) - reference).max() <= 1


@COLOUR_FAST
def test_cli_grid_and_one_picture_at_the_models_size(exported, tmp_path):
    """`ddpm gen` writes n > 1 pictures as a padded grid (2 x scale) and one picture bare, at the model's size: the
    picture `generate` returns for the same options."""
    loaded, _ = exported
    base = ["gen", "--ckpt", loaded.path, "--engine", "onnx", "--sampler", "ddim", "--steps", 3, "-q"]
    r = invoke(*base, "-n", 4, "--label", 3, "--out", tmp_path / "grid.png")   # 2 x 2 pictures
    assert r.exit_code == 0, r.output
    h, w = loaded.cfg.image_shape[1:]
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (2 * (2 * (w + 2) + 2), 2 * (2 * (h + 2) + 2))
        assert grid.mode == ("L" if loaded.cfg.in_channels == 1 else "RGB")
    r = invoke(*base, "-n", 1, "--out", tmp_path / "one.png")
    assert r.exit_code == 0, r.output
    one = np.asarray(Image.open(tmp_path / "one.png"))
    expected = ddpm.load(loaded.path).generate(1, engine="onnx", sampler="ddim", steps=3)
    assert one.shape == _pictures(loaded.cfg, 1)[1:] and np.array_equal(one, expected[0])


@COLOUR_FAST
def test_edit_and_inpaint_at_the_models_size(exported, tmp_path):
    """An edit and an inpainting through the API and the CLI: a picture of another size is fitted to the model's,
    the results are at the model's size, and inpainting keeps the known half exactly."""
    loaded, _ = exported
    h, w = loaded.cfg.image_shape[1:]
    picture = np.zeros((20, 20), np.uint8)
    picture[4:16, 8:12] = 255
    model = ddpm.load(loaded.path)
    edited = model.edit(picture, label=3, strength=0.5, n=2, steps=4, engine="onnx")
    assert edited.shape == _pictures(loaded.cfg, 2)
    fitted = model.picture(picture)
    painted = model.inpaint(fitted, "bottom", n=2, steps=4, engine="onnx")
    assert painted.shape == _pictures(loaded.cfg, 2)
    assert np.array_equal(painted[:, : h // 2], np.broadcast_to(fitted[: h // 2], (2, *fitted[: h // 2].shape)))


@COLOUR_FAST
def test_cli_edit_at_the_models_size(exported, tmp_path):
    """`ddpm edit` fits a picture of another size to the model's and writes the input and the results as a grid."""
    loaded, _ = exported
    h, w = loaded.cfg.image_shape[1:]
    picture = np.zeros((20, 20), np.uint8)
    picture[4:16, 8:12] = 255
    Image.fromarray(picture).save(tmp_path / "in.png")
    r = invoke("edit", "--ckpt", loaded.path, "--image", tmp_path / "in.png", "--label", 3, "-n", 2, "--steps", 4,
               "--engine", "onnx", "-q", "--out", tmp_path / "e.png")
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "e.png") as grid:
        assert grid.size == (2 * (3 * (w + 2) + 2), 2 * (h + 2 + 2))
        assert grid.mode == ("L" if loaded.cfg.in_channels == 1 else "RGB")


def test_cli_one_digit_is_the_bare_digit(tmp_path):
    """`ddpm gen -n 1 --out d.png` writes the digit itself (28x28 for an MNIST model), the one `generate` returns,
    not a padded grid of one."""
    loaded = tiny_checkpoint(tmp_path)
    r = invoke("gen", "--ckpt", loaded.path, "--engine", "onnx", "--sampler", "ddim", "--steps", 3, "-q", "-n", 1,
               "--out", tmp_path / "d.png")
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "d.png") as picture:
        assert picture.size == (28, 28) and picture.mode == "L"
        digit = np.asarray(picture)
    assert np.array_equal(digit, ddpm.load(loaded.path).generate(1, engine="onnx", sampler="ddim", steps=3)[0])


@COLOUR_FAST
def test_cli_samples_file_and_trajectory_at_the_models_size(exported, tmp_path, fake_mnist):
    """`ddpm gen --out x.npz` holds the pictures `generate` returns, (N, H, W) or (N, H, W, C), read back with the
    shape check (a reader of 28x28 digits refuses them in one line); --trajectory writes a greyscale or RGB
    picture; `ddpm eval`, whose classifier reads 1x28x28 digits, refuses the model in one line."""
    from ddpm.samples import SamplesError, read_samples

    loaded, _ = exported
    c, h, w = loaded.cfg.image_shape
    kw = dict(engine="onnx", sampler="ddim", steps=3)
    r = invoke("gen", "--ckpt", loaded.path, *[a for k, v in kw.items() for a in (f"--{k}", v)], "-q", "-n", 3,
               "--out", tmp_path / "s.npz", "--trajectory", tmp_path / "t.png")
    assert r.exit_code == 0, r.output
    images, labels = read_samples(tmp_path / "s.npz", _pictures(loaded.cfg, 1)[1:])
    assert np.array_equal(images, ddpm.load(loaded.path).generate(3, **kw)) and labels.tolist() == [0, 1, 2]
    with pytest.raises(SamplesError, match=r"images of shape \(3, 32, 32.*but \(N, 28, 28\) are read here"):
        read_samples(tmp_path / "s.npz", (28, 28))
    with Image.open(tmp_path / "t.png") as traj:
        assert traj.mode == ("L" if c == 1 else "RGB")
    r = invoke("eval", "--ckpt", loaded.path, "-n", 300, "--data", fake_mnist, "--engine", "torch")
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        "Error: ddpm eval scores 1x28x28 models (its classifier reads greyscale MNIST digits); this model makes "
        f"{c}x{h}x{w} images"], r.output


@COLOUR_FAST
def test_upscale_and_restore_at_the_models_size(exported):
    """Upscaling and restoration at the model's size: upscaled pictures' f x f block means are the small picture's
    pixels within half a level, in every channel (an RGB small picture for the colour model)."""
    loaded, _ = exported
    c, h, w = loaded.cfg.image_shape
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, _pictures(loaded.cfg, 1)[1:], dtype=np.uint8)[::2, ::2]
    model = ddpm.load(loaded.path)
    big = model.upscale(small, 2, n=2, steps=3, engine="onnx")
    assert big.shape == _pictures(loaded.cfg, 2)
    means = big.reshape(2, h // 2, 2, w // 2, 2, *big.shape[3:]).mean(axis=(2, 4))
    assert np.abs(means - small).max() <= 0.5
    restored = model.restore(model.picture(small), 0.3, n=2, steps=3, engine="onnx")
    assert restored.shape == _pictures(loaded.cfg, 2)


def test_colour_pictures_convention(tmp_path):
    """runtime.images' one convention: to_uint8 and from_uint8 are inverse on every level, (N, C, H, W) <->
    (N, H, W) for one channel and (N, H, W, C) for three; a colour model's picture parser reads an RGB file as it
    is, a grey file or array in all three channels, an RGBA file composited over black, and tells a stack from one
    picture; a grey model's parser refuses an RGB array in one line; masks stay (H, W)."""
    from ddpm.runtime.images import ImageError, from_uint8, inpaint_inputs, picture, pictures, read_image

    rng = np.random.default_rng(0)
    for shape, model_shape in (((2, 5, 6), (2, 1, 5, 6)), ((2, 5, 6, 3), (2, 3, 5, 6))):
        u = rng.integers(0, 256, shape, dtype=np.uint8)
        assert from_uint8(u).shape == model_shape and np.array_equal(to_uint8(from_uint8(u)), u)
    rgb = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (6, 8), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(grey).save(tmp_path / "grey.png")
    alpha = np.full((6, 8), 128, np.uint8)
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "rgba.png")
    assert np.array_equal(read_image(tmp_path / "rgb.png", 3), rgb)
    assert np.array_equal(read_image(tmp_path / "grey.png", 3), np.dstack([grey] * 3))
    assert np.array_equal(read_image(tmp_path / "rgba.png", 3), np.rint(rgb * (128 / 255)).astype(np.uint8))
    assert np.array_equal(picture(grey, channels=3), np.dstack([grey] * 3))
    with pytest.raises(ImageError, match=r"a \(H, W\) uint8 array, got uint8 \(6, 8, 3\)"):
        picture(rgb)
    assert len(pictures(rgb, None, channels=3)[0]) == 1 and pictures(rgb, None, channels=3)[1] == 8
    assert pictures(np.stack([rgb, rgb]), None, channels=3)[1] == 2
    assert pictures(np.stack([grey, grey]), None, channels=3)[0][1].shape == (6, 8, 3)
    Image.fromarray(np.where(np.arange(8) < 4, 255, 0).astype(np.uint8)[None].repeat(6, 0)).save(tmp_path / "m.png")
    images, kept, n = inpaint_inputs(tmp_path / "rgb.png", tmp_path / "m.png", 2, (6, 8), channels=3)
    assert images.shape == (1, 6, 8, 3) and kept.shape == (1, 6, 8) and kept[0, :, :4].all() and n == 2


def test_a_model_of_other_channels_is_refused_in_one_line(tmp_path):
    """Pictures are grey or RGB: sampling or editing a 2-channel model is one DdpmError / `Error:` line (exit 1)
    for gen, the editing commands and the API, before any work: never pictures made of some of its channels."""
    from ddpm.errors import DdpmError

    loaded = tiny_checkpoint(tmp_path / "m", cfg=dataclasses.replace(TINY, image_size=32, in_channels=2))
    refusal = "this model makes 2x32x32 images, and ddpm writes grey (1 channel) or RGB (3 channels) pictures only"
    model = ddpm.load(loaded.path)
    for engine in ("torch", "onnx-generator"):
        with pytest.raises(DdpmError, match=re.escape(refusal)):
            model.generate(2, engine=engine, sampler="ddim", steps=2)
    bar = np.zeros((32, 32), np.uint8)
    bar[8:24, 14:18] = 255
    with pytest.raises(DdpmError, match=re.escape(refusal)):
        model.restore(bar, 0.3, n=1, steps=2, engine="torch")
    Image.fromarray(bar).save(tmp_path / "in.png")
    for args in (["gen", "-n", 2], ["gen", "-n", 2, "--engine", "onnx-generator"],
                 ["upscale", "--image", tmp_path / "in.png", "--factor", 2, "-n", 1],
                 ["inpaint", "--image", tmp_path / "in.png", "-n", 1]):
        r = invoke(*args, "--ckpt", loaded.path, "--steps", 2, "--out", tmp_path / "o.png")
        assert r.exit_code == 1 and r.output.strip().splitlines()[-1].startswith("Error: ") and \
            refusal in r.output and "Traceback" not in r.output, r.output
        assert not (tmp_path / "o.png").exists()


def test_a_colour_model_has_no_web_page(tmp_path):
    """The web page draws grey levels only: `export --web` refuses a 3-channel model in one line before any work (no
    folder written)."""
    loaded = tiny_checkpoint(tmp_path / "m", cfg=SHAPES["3x32x32"])
    refusal = "this model makes 3x32x32 images, and the web page (--web) draws greyscale pictures only"
    (tmp_path / "ort.tgz").write_bytes(b"not a tarball")   # never read: the refusal comes first
    r = invoke("export", "--ckpt", loaded.path, "--out", tmp_path / "exp", "--steps", 2, "--web", tmp_path / "site",
               "--ort-web", tmp_path / "ort.tgz")
    assert r.exit_code == 1 and r.output.strip().splitlines() == [f"Error: {refusal}"], r.output
    assert not (tmp_path / "exp").exists() and not (tmp_path / "site").exists()


@pytest.mark.slow
def test_a_colour_model_has_a_generator_and_bench_times_it(tmp_path):
    """generator.onnx writes RGB pictures for a colour model: `export --generator` builds and verifies it (its
    images output (B, H, W, C)), the API's generator_bundle gives it and bench times the onnx-generator engine."""
    loaded = tiny_checkpoint(tmp_path / "m", cfg=SHAPES["3x32x32"])
    r = invoke("export", "--ckpt", loaded.path, "--out", tmp_path / "exp", "--steps", 2, "--generator")
    assert r.exit_code == 0, r.output
    gens = Bundle.load(tmp_path / "exp").generators
    assert len(gens) == 1 and gens[0]["parity"]["max_abs_grey"] <= 1 and gens[0]["outputs"] == {
        "images": "uint8 (B,H,W,C)"}
    model = ddpm.load(loaded.path)
    assert model.generator_bundle(model.plan("ddim", 2)).generators
    r = invoke("bench", "--ckpt", loaded.path, "--engines", "onnx,onnx-generator", "--quick", "--no-baseline",
               "--out", tmp_path / "bench")
    assert r.exit_code == 0 and "Traceback" not in r.output and "skipped" not in r.output, r.output
    assert "onnx-generator  " in r.output, r.output
