#!/usr/bin/env node
// facecast's second face judge: a recogniser that is not derived from dlib, used only to
// score swaps in benchmarks and tests (facecast/quality/judges.py drives it).
//
// Protocol: one JSON object per line.
//   stdin:  {"id": <any>, "path": "/abs/image.png"}        (PNG or JPEG, a whole photo)
//   stdout: {"ready": true, "model": "faceres", ...}       once, when the models are loaded
//           {"id": <same>, "embedding": [1024 floats], "box": [x0, y0, x1, y1], "score": s}
//           {"id": <same>, "error": "no face" | "<why>"}   one answer per request, in order
// The process exits when stdin closes. Everything else (library logs) goes to stderr.
//
// Pipeline, all of it Human's own (@vladmandic/human 3.3.6, node-wasm build), with nothing
// from facecast's face analysis:
//   1. BlazeFace (models/blazeface.json) finds faces on the whole image; the box is enlarged
//      1.4x and made square (src/face/blazeface.ts getBoxes, config face.detector.scale).
//   2. The box is cut out and resized to 256x256, values /255 -> 0..1 (src/face/facemeshutil.ts
//      cutAndResize), first rotated upright by the eye line when face.detector.rotation is on
//      (correctFaceRotation); FaceMesh + iris run on that crop and confirm the face.
//   3. FaceRes (models/faceres.json, HSE-FaceRes, input [N,224,224,3]) gets that crop resized
//      bilinearly to 224x224 and multiplied by 255, i.e. RGB 0..255, no mean/std
//      (src/face/faceres.ts enhance(); no extra crop: config face.description.crop unset).
//      Of its three outputs, the [1,1024] one (global_pooling/Mean) is the descriptor Human
//      returns as face.embedding (faceres.ts predict(): resT.find(t => t.shape[1] === 1024));
//      the others are gender [1,1] and age [1,100].
// We keep the largest face (box area) and compare embeddings by cosine distance (Python side).

import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

// stdout carries the protocol only: Human and tfjs log with console.log/warn.
const emit = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
for (const level of ['log', 'info', 'warn', 'debug']) console[level] = (...args) => console.error(...args);

const here = path.dirname(fileURLToPath(import.meta.url));
const modules = path.join(here, 'node_modules');
const require = createRequire(import.meta.url);

const tf = require('@tensorflow/tfjs-core');
const { PNG } = require('pngjs');
const jpeg = require('jpeg-js');
// The package's "exports" map spells this entry without "./", so Node cannot resolve it by
// name: load the file itself. It requires tfjs-core/-converter/-backend-wasm from our
// node_modules, i.e. the same tfjs-core instance as above.
const { Human } = require(path.join(modules, '@vladmandic/human/dist/human.node-wasm.js'));

const MODEL = 'faceres';
const DIM = 1024;

// Models are read from disk: without tfjs-node, tfjs has no file:// loader, and Human would
// otherwise fetch them over HTTP. The weights are the .bin files named in each model.json.
tf.io.registerLoadRouter((url) => {
  const where = Array.isArray(url) ? url[0] : url;
  if (typeof where !== 'string' || !where.startsWith('file://')) return null;
  const file = where.slice('file://'.length);
  return {
    load: async () => {
      const json = JSON.parse(fs.readFileSync(file, 'utf8'));
      return tf.io.getModelArtifactsForJSON(json, async (manifest) => {
        const specs = [];
        const parts = [];
        for (const group of manifest) {
          specs.push(...group.weights);
          for (const p of group.paths) parts.push(fs.readFileSync(path.join(path.dirname(file), p)));
        }
        const all = Buffer.concat(parts);
        return [specs, all.buffer.slice(all.byteOffset, all.byteOffset + all.byteLength)];
      });
    },
  };
});

const config = {
  backend: 'wasm',
  // the .wasm files ship in the npm package; Human's default is a CDN URL
  wasmPath: `${path.join(modules, '@tensorflow/tfjs-backend-wasm/dist')}/`,
  wasmPlatformFetch: false,
  modelBasePath: `file://${path.join(modules, '@vladmandic/human/models')}/`,
  debug: false,
  warmup: 'none', // Human's warm-up needs a canvas or tfjs-node; we warm up below
  cacheModels: false,
  // Human reuses the previous result when a new input looks similar (cacheSensitivity) or
  // when little time passed (skipFrames/skipTime): fine for video, wrong for a judge that is
  // shown a swap right after its original. Every image is analysed from scratch.
  cacheSensitivity: 0,
  skipAllowed: false,
  async: false,
  filter: { enabled: false }, // no image filters: the judge sees the pixels it is given
  face: {
    enabled: true,
    detector: {
      rotation: true, // straighten tilted heads before the descriptor
      maxDetected: 20,
      minConfidence: 0.2,
      skipFrames: 0,
      skipTime: 0,
      return: false,
    },
    mesh: { enabled: true }, // confirms detections and refines the face box
    iris: { enabled: true },
    attention: { enabled: false },
    emotion: { enabled: false },
    antispoof: { enabled: false },
    liveness: { enabled: false },
    description: { enabled: true, modelPath: `${MODEL}.json`, skipFrames: 0, skipTime: 0 },
  },
  body: { enabled: false },
  hand: { enabled: false },
  object: { enabled: false },
  gesture: { enabled: false },
  segmentation: { enabled: false },
};

/** RGB float32 0..255 as Human expects from a tensor input, alpha composited onto white. */
function decode(file) {
  const buf = fs.readFileSync(file);
  let width;
  let height;
  let rgba;
  if (buf.length > 8 && buf.readUInt32BE(0) === 0x89504e47) {
    ({ width, height, data: rgba } = PNG.sync.read(buf)); // always 8-bit RGBA out
  } else if (buf.length > 3 && buf[0] === 0xff && buf[1] === 0xd8) {
    // no EXIF rotation here: facecast sends PNGs it wrote itself
    ({ width, height, data: rgba } = jpeg.decode(buf, { useTArray: true, formatAsRGBA: true, maxMemoryUsageInMB: 2048 }));
  } else {
    throw new Error('unsupported image format (PNG or JPEG)');
  }
  const rgb = new Float32Array(width * height * 3);
  for (let i = 0, j = 0; i < width * height; i++, j += 3) {
    const a = rgba[i * 4 + 3] / 255;
    for (let c = 0; c < 3; c++) rgb[j + c] = rgba[i * 4 + c] * a + 255 * (1 - a);
  }
  return tf.tensor4d(rgb, [1, height, width, 3]);
}

async function embed(file) {
  const input = decode(file);
  let result;
  try {
    result = await human.detect(input);
  } finally {
    tf.dispose(input);
  }
  if (result.error) throw new Error(result.error);
  const faces = (result.face || []).filter((f) => f.embedding && f.embedding.length === DIM);
  if (!faces.length) return null;
  const area = (f) => f.box[2] * f.box[3];
  const face = faces.reduce((best, f) => (area(f) > area(best) ? f : best));
  const [x, y, w, h] = face.box;
  return { embedding: Array.from(face.embedding), box: [x, y, x + w, y + h], score: face.score };
}

/** Runs every loaded model once on zeros, so the first real image does not pay for it. */
function warmUp() {
  for (const model of Object.values(human.models.models)) {
    if (!model || !model.inputs?.[0]?.shape) continue;
    const shape = model.inputs[0].shape.map((d, i) => (d > 0 ? d : i === 0 ? 1 : 64));
    const zeros = tf.zeros(shape);
    tf.dispose(model.execute(zeros));
    tf.dispose(zeros);
  }
}

const started = Date.now();
const human = new Human(config);
await human.tf.ready();
await human.load();
const loaded = human.models.loaded();
for (const need of ['blazeface', 'facemesh', MODEL]) {
  if (!loaded.includes(need)) {
    emit({ ready: false, error: `model ${need} did not load from ${config.modelBasePath}` });
    process.exit(1);
  }
}
warmUp();
emit({
  ready: true,
  model: MODEL,
  dim: DIM,
  human: human.version,
  tfjs: tf.version_core,
  backend: human.tf.getBackend(),
  startup_ms: Date.now() - started,
});

const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of lines) { // one request at a time, answered in order
  if (!line.trim()) continue;
  let id = null;
  try {
    const request = JSON.parse(line);
    id = request.id ?? null;
    if (typeof request.path !== 'string') throw new Error('request has no "path"');
    const found = await embed(request.path);
    emit(found ? { id, ...found } : { id, error: 'no face' });
  } catch (err) {
    emit({ id, error: String(err && err.message ? err.message : err) });
  }
}
