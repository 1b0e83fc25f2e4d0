// The page: generator.onnx (the whole reverse loop in one model) on onnxruntime-web's WebAssembly backend, in this
// browser; the starting noise from noise.mjs, the same stream as `ddpm gen`. Nothing runs on the server.
import * as ort from "./ort/ort.wasm.min.mjs";
import { classChoices, labelsOf } from "./labels.mjs";
import { split64, startingNoise } from "./noise.mjs";

const SCALE = 2;   // every image pixel drawn as SCALE x SCALE canvas pixels, as the PNG of `ddpm gen`
const PAD = 2;     // the grid of runtime/images.py: 2 black pixels around and between the digits
const $ = (id) => document.getElementById(id);
ort.env.wasm.wasmPaths = new URL("./ort/", import.meta.url).href;
ort.env.wasm.proxy = true;   // run onnxruntime in a web worker: the page stays responsive while it generates

function setStatus(text, state) {
  const s = $("status");
  s.textContent = text;
  s.dataset.state = state;
  s.className = state === "error" ? "error" : "";
}

// The inputs of one run, checked: the same ranges as `ddpm gen`.
function readForm(meta) {
  const count = Number($("count").value);
  if (!Number.isInteger(count) || count < 1 || count > 64) throw new RangeError("digits must be an integer in 1..64");
  const text = $("guidance").value.trim();   // "" for an empty field and for what a number field cannot parse
  let guidance = Number(text);
  if (text === "" || !Number.isFinite(guidance) || guidance < 0 || guidance > meta.max_guidance) {
    throw new RangeError(`guidance must be a number in 0..${meta.max_guidance}`);
  }
  const seed = $("seed").value.trim();
  split64(seed, "seed");   // throws a RangeError outside 0..2^64-1
  const choice = $("label").value;
  const labels = labelsOf(meta, choice, count);   // throws a RangeError outside the model's classes
  if (choice === "none") guidance = 0;   // unconditional: the null label alone, as `ddpm gen --uncond`
  const which = choice === "turn" ? "" : choice === "none" ? " --uncond" : ` --label ${choice}`;
  // DIR: an export folder of the page's weights, named by their hash (the page holds no path of the builder's)
  const dir = /(^| )--export DIR( |$)/.test(meta.gen_options || "") ?
    ` (DIR: an export folder of the weights ${meta.checkpoint_hash.slice(0, 16)}, made by ddpm export)` : "";
  const cli = `ddpm gen -n ${count}${which}${choice === "none" ? "" : ` -w ${guidance}`} --seed ${seed}` +
    (meta.gen_options ? ` ${meta.gen_options}` : "") + dir;
  return { count, guidance, seed, labels, cli, nrow: choice === "turn" ? meta.num_classes : null };
}

// Tile (n, H, W) uint8 images as runtime/images.grid does, each pixel SCALE x SCALE, onto the canvas.
function draw(images, n, H, W, nrow) {
  const cols = nrow || Math.max(1, Math.ceil(Math.sqrt(n)));
  const rows = Math.ceil(n / cols);
  const gw = cols * (W + PAD) + PAD, gh = rows * (H + PAD) + PAD;
  const canvas = $("digits");
  canvas.width = gw * SCALE;
  canvas.height = gh * SCALE;
  canvas.dataset.scale = String(SCALE);
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(canvas.width, canvas.height);
  const px = img.data;
  for (let i = 3; i < px.length; i += 4) px[i] = 255;   // opaque black background
  for (let k = 0; k < n; k++) {
    const top = PAD + Math.floor(k / cols) * (H + PAD), left = PAD + (k % cols) * (W + PAD);
    for (let y = 0; y < H * SCALE; y++) {
      for (let x = 0; x < W * SCALE; x++) {
        const v = images[k * H * W + Math.floor(y / SCALE) * W + Math.floor(x / SCALE)];
        const o = 4 * ((top * SCALE + y) * canvas.width + left * SCALE + x);
        px[o] = px[o + 1] = px[o + 2] = v;
      }
    }
  }
  ctx.putImageData(img, 0, 0);
}

async function main() {
  const meta = await (await fetch("model.json")).json();
  $("guidance").value = String(meta.guidance);
  $("guidance").max = String(meta.max_guidance);   // gen's range (the form is not validated by the browser)
  $("label").replaceChildren(...classChoices(meta).map(([value, text]) => new Option(text, value)));
  const t0 = performance.now();
  const session = await ort.InferenceSession.create("generator.onnx", { executionProviders: ["wasm"] });
  const loadMs = performance.now() - t0;
  const [C, H, W] = meta.image_shape;
  $("about").textContent = `${meta.plan} (${meta.steps} steps) in one ONNX model on onnxruntime-web ` +
    `${ort.env.versions.web} (WebAssembly, ${ort.env.wasm.numThreads || 1} thread(s)), loaded in ` +
    `${loadMs.toFixed(0)} ms. A seed gives the same digits as "ddpm gen --seed S".`;
  $("go").disabled = false;
  setStatus("ready", "ready");

  $("form").addEventListener("submit", async (event) => {
    event.preventDefault();
    let run;
    try {
      run = readForm(meta);
    } catch (e) {
      setStatus(e.message, "error");
      return;
    }
    $("go").disabled = true;
    setStatus(`generating ${run.count} digits...`, "running");
    await new Promise((r) => setTimeout(r, 0));   // let the status paint
    try {
      const tNoise = performance.now();
      const noise = startingNoise(run.seed, 0, run.count, C * H * W);
      const tRun = performance.now();
      const out = await session.run({
        x_T: new ort.Tensor("float32", noise, [run.count, C, H, W]),
        labels: new ort.Tensor("int64", run.labels, [run.count]),
        guidance: new ort.Tensor("float32", new Float32Array([run.guidance]), []),
      });
      const ms = performance.now() - tRun;
      draw(out.images.data, run.count, H, W, run.nrow);
      $("status").dataset.ms = ms.toFixed(1);
      $("cli").textContent = `the same digits as: ${run.cli}`;
      setStatus(`${run.count} digits in ${(ms / 1000).toFixed(2)} s ` +
                `(${(ms / run.count).toFixed(0)} ms per digit; noise ${(tRun - tNoise).toFixed(0)} ms)`, "done");
    } catch (e) {
      setStatus(`generation failed: ${e.message}`, "error");
    } finally {
      $("go").disabled = false;
    }
  });
}

main().catch((e) => setStatus(`cannot load the generator: ${e.message}`, "error"));
