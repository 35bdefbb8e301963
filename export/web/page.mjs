// The in-browser page of `gmaivl-rt export web`: transformers.js + onnxruntime-web from this same origin, the
// model from ./model/ (an `export onnx --layout transformers.js` folder). The picture is read from the file input
// here (medical.mjs: DICOM windowing as the Python reader does it, expand2square, PIL's bicubic; dicom-parser from
// lib/); nothing but GET requests for the page, the libraries and the model leave the page.
import { AutoProcessor, LlavaForConditionalGeneration, RawImage, TextStreamer, env } from './lib/transformers.min.js';
import { codecLoaders, pictureForModel } from './medical.mjs';

const site = await (await fetch('./site.json')).json();
env.allowRemoteModels = false;            // never a model hub
env.allowLocalModels = true;
// a path, not a URL: transformers.js checks local files only at non-URL paths (and fetches them from this origin)
env.localModelPath = new URL('./', location.href).pathname;
// onnxruntime-web's WASM runtime from this origin (transformers.js would fetch it from a CDN otherwise)
env.backends.onnx.wasm.wasmPaths = {
  mjs: new URL(`./lib/${site.ort_wasm}.mjs`, location.href).href,
  wasm: new URL(`./lib/${site.ort_wasm}.wasm`, location.href).href,
};
env.backends.onnx.wasm.proxy = false;

// JPEG 2000 and JPEG-LS decoders (classic scripts of index.html), their .wasm from this origin's lib/
const codecs = codecLoaders({ OpenJPEGWASM: globalThis.OpenJPEGWASM, CharLSWASM: globalThis.CharLSWASM },
                            (name) => new URL(`./lib/${name}`, location.href).href);

const $ = (id) => document.getElementById(id);
const status = (text) => { $('status').textContent = text; };
for (const dtype of site.dtypes) $('dtype').add(new Option(dtype, dtype));
// WebGPU only where the browser hands out an adapter (headless and older browsers have navigator.gpu without one)
const adapter = site.webgpu !== false && navigator.gpu ? await navigator.gpu.requestAdapter().catch(() => null) : null;
const device = adapter ? 'webgpu' : 'wasm';

let loaded = null;
async function model(dtype) {
  if (loaded?.dtype === dtype) return loaded;
  status(`loading the model (${dtype}, ${device})…`);
  const processor = await AutoProcessor.from_pretrained('model', { local_files_only: true });
  const net = await LlavaForConditionalGeneration.from_pretrained('model', { local_files_only: true, dtype, device });
  loaded = { dtype, processor, net };
  return loaded;
}

async function ask() {
  const file = $('image').files[0];
  if (!file) { status('choose a picture first'); return; }
  $('ask').disabled = true;
  $('answer').textContent = '';
  try {
    const { processor, net } = await model($('dtype').value);
    status('reading the picture…');
    const side = processor.image_processor.config.size.height;
    const image = await pictureForModel(new Uint8Array(await file.arrayBuffer()), {   // decoded here, locally
      RawImage, dicomParser: globalThis.dicomParser, side, codecs, decode: (bytes) => RawImage.fromBlob(new Blob([bytes])),
    });
    const messages = [{ role: 'user', content: `<image>\n${$('question').value}` }];
    const prompt = processor.tokenizer.apply_chat_template(messages, { tokenize: false, add_generation_prompt: true });
    const inputs = await processor(image, prompt);
    status('answering…');
    const started = performance.now();
    let firstToken = null;
    let count = 0;
    const streamer = new TextStreamer(processor.tokenizer, {
      skip_prompt: true, skip_special_tokens: true,
      callback_function: (text) => { $('answer').textContent += text; },
      token_callback_function: () => { count += 1; firstToken ??= performance.now(); },
    });
    const output = await net.generate({ ...inputs, max_new_tokens: site.max_new_tokens, do_sample: false, streamer });
    const done = performance.now();
    const promptLength = inputs.input_ids.dims.at(-1);
    const tokens = Array.from(output.slice(null, [promptLength, null]).data, Number);
    $('answer').dataset.tokens = JSON.stringify(tokens);
    const ttft = (firstToken ?? done) - started;
    const rate = tokens.length > 1 ? (tokens.length - 1) / ((done - (firstToken ?? done)) / 1000) : 0;
    $('answer').dataset.timing = JSON.stringify({ ttft_ms: ttft, tokens_per_s: rate, tokens: tokens.length, device });
    status(`done: first token after ${ttft.toFixed(0)} ms, ${rate.toFixed(1)} tokens/s (${device})`);
  } catch (error) {
    status(`error: ${error.message ?? error}`);
    $('answer').dataset.error = String(error.message ?? error);
  } finally {
    $('ask').disabled = false;
  }
}

$('ask').addEventListener('click', ask);
try {
  await model(site.dtypes[0]);
  status('ready');
  $('ask').disabled = false;
} catch (error) {
  status(`error: the model did not load: ${error.message ?? error}`);
}
