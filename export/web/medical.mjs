// Pictures for the model, read in JavaScript with the Python reader's rules, so the browser page and Node see the
// pixels `gmaivl-rt ask` sees (gmaivl_rt/medical/dicom.py + windowing.py, gmaivl_rt/model/preprocess.py):
//   DICOM  greyscale, first frame: uncompressed (Explicit/Implicit VR Little Endian, Explicit VR Big Endian), RLE
//          Lossless (decoded here), JPEG 2000 (lossless and lossy: OpenJPEG, @cornerstonejs/codec-openjpeg) and
//          JPEG-LS (lossless and near-lossless: CharLS, @cornerstonejs/codec-charls), the WebAssembly decoders the
//          page loads from its own lib/ (see `codecLoaders`):
//          Modality LUT (rescale slope/intercept), then the file's window (VOI LUT function LINEAR, LINEAR_EXACT,
//          SIGMOID), else a named CT window by body part (abdomen by default), else the 0.5-99.5 percentiles;
//          MONOCHROME1 inverted; [0, 1] -> uint8 as numpy rounds (half to even, float32).
//   then   LLaVA's expand2square (pad with the CLIP mean colour) and PIL's bicubic resize to the model's square.
//   NIfTI  (.nii, .nii.gz) as gmaivl_rt/medical/nifti.py reads it: see readNifti below.
// What the Python reader does and this does not (JPEG baseline/extended/lossless, HTJ2K, deflate, VOI LUT / Modality LUT sequences,
// colour and palette DICOM, non-square pixel spacing, sheared NIfTI affines) is refused with the reason: ask the
// server instead.

export const CT_WINDOWS = { lung: [-600, 1500], mediastinum: [50, 350], bone: [400, 1800], brain: [40, 80],
                            abdomen: [40, 400] };
export const CT_WINDOW_BY_BODY_PART = {
  head: 'brain', brain: 'brain', skull: 'bone', chest: 'mediastinum', thorax: 'mediastinum', lung: 'lung',
  abdomen: 'abdomen', pelvis: 'abdomen', liver: 'abdomen', spine: 'bone', cspine: 'bone', tspine: 'bone',
  lspine: 'bone', extremity: 'bone',
};
export const CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073];
const UNCOMPRESSED = { '1.2.840.10008.1.2': true, '1.2.840.10008.1.2.1': true, '1.2.840.10008.1.2.2': false };
// compressed transfer syntaxes the Python reader decodes (with the dicom-codecs extra); DECODERS says which of
// them this page decodes too (the others are refused, naming the syntax)
const COMPRESSED_NAMES = {
  '1.2.840.10008.1.2.4.50': 'JPEG Baseline', '1.2.840.10008.1.2.4.51': 'JPEG Extended',
  '1.2.840.10008.1.2.4.57': 'JPEG Lossless', '1.2.840.10008.1.2.4.70': 'JPEG Lossless SV1',
  '1.2.840.10008.1.2.4.80': 'JPEG-LS Lossless', '1.2.840.10008.1.2.4.81': 'JPEG-LS Near-Lossless',
  '1.2.840.10008.1.2.4.90': 'JPEG 2000 Lossless', '1.2.840.10008.1.2.4.91': 'JPEG 2000',
  '1.2.840.10008.1.2.4.201': 'HTJ2K Lossless', '1.2.840.10008.1.2.4.202': 'HTJ2K Lossless RPCL',
  '1.2.840.10008.1.2.4.203': 'HTJ2K', '1.2.840.10008.1.2.5': 'RLE Lossless',
  '1.2.840.10008.1.2.1.99': 'Deflated Explicit VR Little Endian',
};

const DECODERS = {
  '1.2.840.10008.1.2.5': 'rle', '1.2.840.10008.1.2.4.90': 'openjpeg', '1.2.840.10008.1.2.4.91': 'openjpeg',
  '1.2.840.10008.1.2.4.80': 'charls', '1.2.840.10008.1.2.4.81': 'charls',
};

// The WebAssembly decoders, each instantiated on first use only: `factories` holds the Emscripten module factories
// (OpenJPEGWASM, CharLSWASM: globals of lib/openjpegwasm_decode.js and lib/charlswasm_decode.js in the page,
// require()d under Node), `locateFile` where their .wasm files lie (the page: its own lib/).
export function codecLoaders({ OpenJPEGWASM, CharLSWASM }, locateFile) {
  const loaded = {};
  const once = (name, factory) => () => {
    if (!factory) refuse(`the ${name} decoder is not loaded`);
    // OpenJPEG logs every header it reads: keep it off the console (and off Node's stdout)
    loaded[name] ??= factory({ ...(locateFile ? { locateFile } : {}), print: () => {}, printErr: () => {} });
    return loaded[name];
  };
  return { openjpeg: once('openjpeg', OpenJPEGWASM), charls: once('charls', CharLSWASM) };
}

// PackBits as DICOM's RLE Lossless uses it (PS3.5 G.3.1): n >= 0 copies n + 1 bytes, -127..-1 repeats the next
// byte 1 - n times, -128 does nothing; stops at `length` decoded bytes.
function unpackBits(data, start, end, length) {
  const out = new Uint8Array(length);
  let i = start;
  let o = 0;
  while (i < end && o < length) {
    const n = (data[i++] << 24) >> 24;
    if (n >= 0) {
      const stop = Math.min(i + n + 1, end);
      out.set(data.subarray(i, stop).subarray(0, length - o), o);
      o += stop - i;
      i = stop;
    } else if (n !== -128) {
      out.fill(data[i++], o, Math.min(o + 1 - n, length));
      o += 1 - n;
    }
  }
  if (o < length) refuse('RLE data shorter than one frame');
  return out;
}

// One RLE frame (PS3.5 Annex G) -> stored values as little-endian bytes: segment k holds byte k of each sample,
// most significant first.
function decodeRle(frame, count, bytesPerSample) {
  const view = new DataView(frame.buffer, frame.byteOffset, frame.byteLength);
  if (frame.length < 64) refuse('an RLE frame without its header');
  const segments = view.getUint32(0, true);
  if (segments !== bytesPerSample) refuse(`an RLE frame of ${segments} segments for ${bytesPerSample}-byte samples`);
  const out = new Uint8Array(count * bytesPerSample);
  for (let k = 0; k < segments; k++) {
    const start = view.getUint32(4 + 4 * k, true);
    const end = k + 1 < segments ? view.getUint32(8 + 4 * k, true) : frame.length;
    const plane = unpackBits(frame, start, end, count);
    const byte = bytesPerSample - 1 - k;
    for (let i = 0; i < count; i++) out[i * bytesPerSample + byte] = plane[i];
  }
  return out;
}

// An Emscripten decoder (OpenJPEG's J2KDecoder, CharLS' JpegLSDecoder) over one frame -> {bytes (little endian),
// bytesPerSample, signed}
function decodeWasm(module, className, frame, rows, columns) {
  const decoder = new module[className]();
  try {
    decoder.getEncodedBuffer(frame.length).set(frame);
    try {
      decoder.decode();
    } catch (error) {
      refuse(`its compressed pixel data cannot be decoded (${typeof error === 'number' ? 'decoder error' : error.message ?? error})`);
    }
    const info = decoder.getFrameInfo();
    if (!info.width) refuse('its compressed pixel data cannot be decoded (no image in the codestream)');
    if (info.width !== columns || info.height !== rows || info.componentCount !== 1) {
      refuse(`its compressed frame is ${info.width} x ${info.height} x ${info.componentCount}, not the header's `
             + `${columns} x ${rows} x 1`);
    }
    return { bytes: decoder.getDecodedBuffer().slice(), bytesPerSample: info.bitsPerSample > 8 ? 2 : 1,
             signed: info.isSigned };
  } finally {
    decoder.delete();
  }
}

// The first frame's bytes of encapsulated pixel data (PS3.5 A.4): every fragment of a single-frame file, else the
// offset table's first frame, else (no offset table) the first fragment when there is one per frame.
function firstFrame(ds, pixel, dicomParser, frames) {
  const fragments = pixel.fragments ?? [];
  if (!fragments.length) refuse('compressed pixel data without fragments');
  if (frames <= 1) return dicomParser.readEncapsulatedPixelDataFromFragments(ds, pixel, 0, fragments.length);
  if ((pixel.basicOffsetTable ?? []).length) return dicomParser.readEncapsulatedImageFrame(ds, pixel, 0);
  if (fragments.length === frames) return dicomParser.readEncapsulatedPixelDataFromFragments(ds, pixel, 0, 1);
  refuse('several frames in fragments without an offset table');
}

export function isDicom(bytes) {
  return bytes.length > 132 && bytes[128] === 0x44 && bytes[129] === 0x49 && bytes[130] === 0x43 && bytes[131] === 0x4d;
}

function refuse(problem) {
  throw new Error(`this DICOM cannot be read in the browser: ${problem}; ask the server instead`);
}

// numpy's rint of a float32 product: round half to even
function rint(x) {
  const r = Math.round(x);
  return (Math.abs(x % 1) === 0.5 && r % 2 !== 0) ? r - 1 : r;
}

function toUint8(unit) {
  const out = new Uint8Array(unit.length);
  for (let i = 0; i < unit.length; i++) {
    const v = rint(Math.fround(Math.fround(unit[i]) * 255));
    out[i] = v < 0 ? 0 : v > 255 ? 255 : v;
  }
  return out;
}

export function applyWindow(values, center, width, fn = 'LINEAR') {
  const out = new Float64Array(values.length);
  fn = (fn || 'LINEAR').toUpperCase();
  if (fn !== 'SIGMOID' && fn !== 'LINEAR_EXACT' && width < 1) refuse(`window width ${width} < 1`);
  for (let i = 0; i < values.length; i++) {
    const x = values[i];
    let y;
    if (fn === 'SIGMOID') y = 1 / (1 + Math.exp(-4 * (x - center) / width));
    else if (fn === 'LINEAR_EXACT') y = (x - center) / width + 0.5;
    else if (width === 1) y = x > center - 0.5 ? 1 : 0;
    else y = (x - (center - 0.5)) / (width - 1) + 0.5;
    out[i] = Math.min(1, Math.max(0, y));
  }
  return out;
}

// numpy.percentile's default (linear) interpolation
function percentile(sorted, q) {
  const index = (q / 100) * (sorted.length - 1);
  const lo = Math.floor(index);
  const hi = Math.min(lo + 1, sorted.length - 1);
  const t = index - lo;
  return sorted[lo] + (sorted[hi] - sorted[lo]) * t;
}

export function percentileUnit(values) {
  const sorted = Float64Array.from(values).sort();
  const lo = percentile(sorted, 0.5);
  let hi = percentile(sorted, 99.5);
  if (hi <= lo) hi = lo + 1;
  return values.map((v) => Math.min(1, Math.max(0, (v - lo) / (hi - lo))));
}

function numbers(ds, tag) {
  const text = ds.string(tag);
  return text === undefined ? [] : text.split('\\').map(Number).filter((n) => Number.isFinite(n));
}

// DICOM bytes -> {width, height, grey: Uint8Array (H*W), window: [c, w] | null, windowName}; `codecs`: from
// `codecLoaders`, for JPEG 2000 and JPEG-LS
export async function readDicom(bytes, dicomParser, codecs = {}) {
  let ds;
  try {
    ds = dicomParser.parseDicom(bytes);
  } catch (error) {
    refuse(`not a readable DICOM file (${error.exception ?? error.message ?? error})`);
  }
  const syntax = (ds.string('x00020010') || '').replace(/\0/g, '').trim();
  if (syntax in COMPRESSED_NAMES && !(syntax in DECODERS)) {
    refuse(`its pixels are compressed (${COMPRESSED_NAMES[syntax]}, transfer syntax ${syntax}), which the page does not `
           + 'decode');
  }
  if (!(syntax in UNCOMPRESSED) && !(syntax in DECODERS)) refuse(`transfer syntax ${syntax || 'missing'} is not supported here`);
  const photometric = (ds.string('x00280004') || '').trim();
  if (photometric !== 'MONOCHROME1' && photometric !== 'MONOCHROME2') refuse(`photometric ${photometric || 'missing'}`);
  if (ds.elements.x00283010) refuse('a VOI LUT sequence');
  if (ds.elements.x00283000) refuse('a Modality LUT sequence');
  const spacing = numbers(ds, 'x00280030');
  if (spacing.length === 2 && Math.abs(spacing[0] - spacing[1]) > 1e-6 * Math.max(spacing[0], spacing[1])) {
    refuse(`non-square pixels (${spacing.join(' x ')} mm)`);
  }
  const rows = ds.uint16('x00280010');
  const columns = ds.uint16('x00280011');
  const bits = ds.uint16('x00280100');
  const stored = ds.uint16('x00280101') ?? bits;
  const signed = ds.uint16('x00280103') === 1;
  const pixel = ds.elements.x7fe00010;
  if (!pixel || !rows || !columns || ![8, 16, 32].includes(bits)) refuse('no pixel data of 8, 16 or 32 bits');
  const count = rows * columns;
  let view;
  let little = true;
  let sampleBytes = bits / 8;
  if (syntax in DECODERS) {
    const frame = firstFrame(ds, pixel, dicomParser, parseInt(ds.string('x00280008') || '1', 10) || 1);
    let decoded;
    if (DECODERS[syntax] === 'rle') decoded = decodeRle(frame, count, sampleBytes);
    else {
      const name = DECODERS[syntax];
      const module = await codecs[name]?.();
      if (!module) refuse(`the ${name} decoder is not loaded`);
      const out = decodeWasm(module, name === 'openjpeg' ? 'J2KDecoder' : 'JpegLSDecoder', frame, rows, columns);
      // a JPEG 2000 / JPEG-LS codestream of up to 16 bits in 16- or 32-bit DICOM samples: read at its own width
      if (out.bytesPerSample > sampleBytes) refuse(`its compressed samples are wider than BitsAllocated ${bits}`);
      decoded = out.bytes;
      sampleBytes = out.bytesPerSample;
    }
    if (decoded.length < count * sampleBytes) refuse('decoded pixel data shorter than one frame');
    view = new DataView(decoded.buffer, decoded.byteOffset, count * sampleBytes);
  } else {
    if (pixel.length < count * sampleBytes) refuse('pixel data shorter than one frame');
    view = new DataView(bytes.buffer, bytes.byteOffset + pixel.dataOffset, count * sampleBytes);
    little = UNCOMPRESSED[syntax];
  }
  const values = new Float64Array(count);
  for (let i = 0; i < count; i++) {
    let v;
    if (sampleBytes === 1) v = signed ? view.getInt8(i) : view.getUint8(i);
    else if (sampleBytes === 2) v = signed ? view.getInt16(2 * i, little) : view.getUint16(2 * i, little);
    else v = signed ? view.getInt32(4 * i, little) : view.getUint32(4 * i, little);
    if (signed && stored < 8 * sampleBytes) { // pydicom sign-extends from BitsStored
      const shift = 32 - stored;
      v = ((v << shift) >> shift);
    }
    values[i] = v;
  }
  const slope = ds.floatString('x00281053');
  if (slope !== undefined) {
    const intercept = ds.floatString('x00281052') ?? 0;
    for (let i = 0; i < count; i++) values[i] = values[i] * slope + intercept;
  }
  const center = numbers(ds, 'x00281050')[0];
  const width = numbers(ds, 'x00281051')[0];
  const modality = (ds.string('x00080060') || '').trim();
  let unit;
  let window = null;
  let windowName;
  if (center !== undefined && width !== undefined) {
    unit = applyWindow(values, center, width, (ds.string('x00281056') || 'LINEAR').trim());
    window = [center, width];
    windowName = 'file';
  } else if (modality === 'CT') {
    const part = (ds.string('x00180015') || '').trim().toLowerCase().replace(/ /g, '');
    windowName = CT_WINDOW_BY_BODY_PART[part] ?? 'abdomen';
    window = CT_WINDOWS[windowName];
    unit = applyWindow(values, ...window);
  } else {
    unit = percentileUnit(values);
    windowName = 'percentile';
  }
  if (photometric === 'MONOCHROME1') unit = unit.map((u) => 1 - u);
  return { width: columns, height: rows, grey: toUint8(unit), window, windowName };
}

export function greyToRgb(grey) {
  const rgb = new Uint8Array(grey.length * 3);
  for (let i = 0; i < grey.length; i++) rgb[3 * i] = rgb[3 * i + 1] = rgb[3 * i + 2] = grey[i];
  return rgb;
}

// LLaVA's expand2square: centre on a square of the CLIP mean colour (int(m * 255) per channel)
export function expandToSquare(rgb, width, height) {
  if (width === height) return { rgb, side: width };
  const side = Math.max(width, height);
  const fill = CLIP_MEAN.map((m) => Math.trunc(m * 255));
  const out = new Uint8Array(side * side * 3);
  for (let i = 0; i < side * side; i++) out.set(fill, 3 * i);
  const left = Math.floor((side - width) / 2);
  const top = Math.floor((side - height) / 2);
  for (let y = 0; y < height; y++) out.set(rgb.subarray(3 * y * width, 3 * (y + 1) * width), 3 * ((top + y) * side + left));
  return { rgb: out, side };
}

// PIL's bicubic resample (Resample.c, 8 bits per channel: a = -0.5, antialiased when shrinking, fixed-point
// coefficients with 22 fractional bits, horizontal pass then vertical, each rounded and clipped to 0..255)
const PRECISION_BITS = 32 - 8 - 2;

function bicubic(x) {
  const a = -0.5;
  x = Math.abs(x);
  if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
}

function coefficients(inSize, outSize) {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const support = 2 * filterScale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = [];
  const kk = [];
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1 / filterScale;
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    const k = new Float64Array(ksize);
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      const w = bicubic((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    const fixed = new Int32Array(ksize);
    for (let x = 0; x < xmax; x++) {
      const w = ww !== 0 ? k[x] / ww : k[x];
      fixed[x] = w < 0 ? Math.trunc(-0.5 + w * (1 << PRECISION_BITS)) : Math.trunc(0.5 + w * (1 << PRECISION_BITS));
    }
    bounds.push([xmin, xmax]);
    kk.push(fixed);
  }
  return { bounds, kk };
}

function clip8(ss) {
  const v = Math.floor(ss / (1 << PRECISION_BITS));
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

export function resizeBicubic(rgb, width, height, outWidth, outHeight) {
  let src = rgb;
  let w = width;
  if (outWidth !== width) {
    const { bounds, kk } = coefficients(width, outWidth);
    const out = new Uint8Array(outWidth * height * 3);
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < outWidth; x++) {
        const [xmin, xmax] = bounds[x];
        for (let c = 0; c < 3; c++) {
          let ss = 1 << (PRECISION_BITS - 1);
          for (let i = 0; i < xmax; i++) ss += src[3 * (y * w + xmin + i) + c] * kk[x][i];
          out[3 * (y * outWidth + x) + c] = clip8(ss);
        }
      }
    }
    src = out;
    w = outWidth;
  }
  if (outHeight !== height) {
    const { bounds, kk } = coefficients(height, outHeight);
    const out = new Uint8Array(w * outHeight * 3);
    for (let y = 0; y < outHeight; y++) {
      const [ymin, ymax] = bounds[y];
      for (let x = 0; x < w; x++) {
        for (let c = 0; c < 3; c++) {
          let ss = 1 << (PRECISION_BITS - 1);
          for (let i = 0; i < ymax; i++) ss += src[3 * ((ymin + i) * w + x) + c] * kk[y][i];
          out[3 * (y * w + x) + c] = clip8(ss);
        }
      }
    }
    src = out;
  }
  return src;
}

// DICOM bytes -> RGB uint8 (side * side * 3) at the model's square, as gmaivl_rt's preprocessing sees it
export async function dicomForModel(bytes, dicomParser, side, codecs = {}) {
  const image = await readDicom(bytes, dicomParser, codecs);
  const square = expandToSquare(greyToRgb(image.grey), image.width, image.height);
  return { ...image, rgb: resizeBicubic(square.rgb, square.side, square.side, side, side), side };
}

// Any picture -> RGB uint8 at the model's square, the way gmaivl_rt preprocesses it: DICOM by `dicomForModel`,
// NIfTI (.nii, .nii.gz) by `readNifti` (options `nifti`: {plane, index, volume}), other files decoded by transformers.js' RawImage (PNG, JPEG, ...), then expand2square and PIL's bicubic.
// Returns a RawImage of side x side, which transformers.js' processor then only rescales and normalises.
export async function pictureForModel(bytes, { RawImage, dicomParser, side, decode, nifti = {}, codecs = {} }) {
  if (isDicom(bytes)) {
    const { rgb } = await dicomForModel(bytes, dicomParser, side, codecs);
    return new RawImage(rgb, side, side, 3);
  }
  const unpacked = isGzip(bytes) ? await gunzip(bytes) : bytes;
  if (isNifti(unpacked)) {
    const image = readNifti(unpacked, nifti);
    const square = expandToSquare(greyToRgb(image.grey), image.width, image.height);
    return new RawImage(resizeBicubic(square.rgb, square.side, square.side, side, side), side, side, 3);
  }
  const image = (await decode(bytes)).rgb();
  const square = expandToSquare(new Uint8Array(image.data), image.width, image.height);
  return new RawImage(resizeBicubic(square.rgb, square.side, square.side, side, side), side, side, 3);
}

// ------------------------------------------------------------------------------------------------------ NIfTI
// gmaivl_rt/medical/nifti.py's rules: NIfTI-1 or -2 (gzipped or not), the affine nibabel picks (sform, else qform,
// else the header zooms with x flipped), reoriented to the closest canonical RAS+ orientation (flips and axis
// order), volume `volume` of a 4D image, the slice `index` (default the middle one) along `plane` in radiological
// display orientation, the 0.5-99.5 percentiles of the whole volume (numpy's linear interpolation), NaN as the low
// end, square pixels by PIL's bilinear float resample, numpy's rounding to uint8. Refused with the reason: a
// sheared affine (nibabel's SVD-based choice of axes is not done here), other data types (complex, RGB, 64-bit
// integers).
const NIFTI_TYPES = { 2: 'Uint8', 4: 'Int16', 8: 'Int32', 16: 'Float32', 64: 'Float64', 256: 'Int8', 512: 'Uint16',
                      768: 'Uint32' };
const NIFTI_PLANE_AXIS = { sagittal: 0, coronal: 1, axial: 2 };

function refuseNifti(problem) {
  throw new Error(`this NIfTI cannot be read in the browser: ${problem}; ask the server instead`);
}

export function isGzip(bytes) {
  return bytes.length > 2 && bytes[0] === 0x1f && bytes[1] === 0x8b;
}

export async function gunzip(bytes) {   // the platform's own decoder (browsers, Node 18+)
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('gzip'));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

function niftiHeaderSize(bytes) {
  if (bytes.length < 348) return null;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (const little of [true, false]) {
    const size = view.getInt32(0, little);
    if (size === 348 && bytes.length >= 348) return { version: 1, little };
    if (size === 540 && bytes.length >= 540) return { version: 2, little };
  }
  return null;
}

export function isNifti(bytes) {
  const kind = niftiHeaderSize(bytes);
  if (!kind) return false;
  const at = kind.version === 1 ? 344 : 4;
  const magic = String.fromCharCode(...bytes.subarray(at, at + 3));
  return magic === 'n+1' || magic === 'n+2';
}

function niftiHeader(bytes) {
  const kind = niftiHeaderSize(bytes);
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const le = kind.little;
  if (kind.version === 1) {
    const f = (o) => v.getFloat32(o, le);
    return {
      dim: Array.from({ length: 8 }, (_, i) => v.getInt16(40 + 2 * i, le)), datatype: v.getInt16(70, le),
      pixdim: Array.from({ length: 8 }, (_, i) => f(76 + 4 * i)), voxOffset: f(108), slope: f(112), inter: f(116),
      qformCode: v.getInt16(252, le), sformCode: v.getInt16(254, le), quatern: [f(256), f(260), f(264)],
      srow: [0, 1, 2].map((r) => [0, 1, 2, 3].map((c) => f(280 + 16 * r + 4 * c))), little: le,
    };
  }
  const d = (o) => v.getFloat64(o, le);
  const i64 = (o) => Number(v.getBigInt64(o, le));
  return {
    dim: Array.from({ length: 8 }, (_, i) => i64(16 + 8 * i)), datatype: v.getInt16(12, le),
    pixdim: Array.from({ length: 8 }, (_, i) => d(104 + 8 * i)), voxOffset: i64(168), slope: d(176), inter: d(184),
    qformCode: v.getInt32(344, le), sformCode: v.getInt32(348, le), quatern: [d(352), d(360), d(368)],
    srow: [0, 1, 2].map((r) => [0, 1, 2, 3].map((c) => d(400 + 32 * r + 8 * c))), little: le,
  };
}

// nibabel's get_best_affine, its 3x3 part: sform, else qform (quaternion, pixdim, qfac), else diag(-x, y, z)
function niftiLinear(h) {
  if (h.sformCode > 0) return h.srow.map((row) => row.slice(0, 3));
  const zooms = [1, 2, 3].map((i) => h.pixdim[i]);
  if (h.qformCode > 0) {
    const [b, c, d] = h.quatern;
    let w2 = 1 - (b * b + c * c + d * d);
    if (w2 < 0) w2 = 0;   // nibabel treats a slightly negative w^2 as 0
    const a = Math.sqrt(w2);
    const R = [[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
               [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
               [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]];
    const qfac = h.pixdim[0] === 0 ? 1 : h.pixdim[0];
    const vox = [zooms[0], zooms[1], zooms[2] * (qfac < 0 ? -1 : 1)];
    return R.map((row) => row.map((x, j) => x * vox[j]));
  }
  return [[-zooms[0], 0, 0], [0, zooms[1], 0], [0, 0, zooms[2]]];
}

// nibabel's io_orientation for an affine without shear: per voxel axis, the world axis and direction it runs along
function niftiOrientation(linear) {
  const norms = [0, 1, 2].map((j) => Math.hypot(linear[0][j], linear[1][j], linear[2][j]) || 1);
  const unit = linear.map((row) => row.map((x, j) => x / norms[j]));
  for (let i = 0; i < 3; i++) {
    for (let j = i + 1; j < 3; j++) {
      const dot = unit[0][i] * unit[0][j] + unit[1][i] * unit[1][j] + unit[2][i] * unit[2][j];
      if (Math.abs(dot) > 1e-6) refuseNifti('a sheared (non-orthogonal) affine');
    }
  }
  const R = unit.map((row) => row.slice());
  const orientation = [];
  for (let j = 0; j < 3; j++) {
    let best = 0;
    for (let i = 1; i < 3; i++) if (Math.abs(R[i][j]) > Math.abs(R[best][j])) best = i;
    orientation.push([best, R[best][j] < 0 ? -1 : 1]);
    R[best] = [0, 0, 0];
  }
  return { orientation, norms };
}

// numpy.percentile (method linear) of sorted float64 values, as numpy 2 computes it in float32 data's dtype
function numpyPercentile(sorted, q) {
  const n = sorted.length;
  const quantile = q / 100;
  const virtual = n * quantile + (1 + quantile * (1 - 1 - 1)) - 1;
  const below = Math.min(Math.max(Math.floor(virtual), 0), n - 1);
  const above = Math.min(Math.max(below + 1, 0), n - 1);
  const t = virtual - Math.floor(virtual);
  const a = sorted[virtual < 0 ? 0 : below];
  const b = sorted[virtual >= n - 1 ? n - 1 : above];
  const diff = Math.fround(b - a);      // float32 data: b - a in float32, then float64 with the weight
  return t >= 0.5 ? b - diff * (1 - t) : a + diff * t;
}

// PIL's bilinear resample of a mode "F" image (Resample.c, 32-bit float: double weights, float32 results)
function resizeFloatBilinear(plane, width, height, outWidth, outHeight) {
  const weights = (inSize, outSize) => {
    const scale = inSize / outSize;
    const filterScale = Math.max(scale, 1);
    const support = filterScale;
    const out = [];
    for (let xx = 0; xx < outSize; xx++) {
      const center = (xx + 0.5) * scale;
      let xmin = Math.trunc(center - support + 0.5);
      if (xmin < 0) xmin = 0;
      let xmax = Math.trunc(center + support + 0.5);
      if (xmax > inSize) xmax = inSize;
      xmax -= xmin;
      const k = new Float64Array(xmax);
      let ww = 0;
      for (let x = 0; x < xmax; x++) {
        const d = Math.abs((x + xmin - center + 0.5) / filterScale);
        k[x] = d < 1 ? 1 - d : 0;
        ww += k[x];
      }
      if (ww !== 0) for (let x = 0; x < xmax; x++) k[x] /= ww;
      out.push([xmin, k]);
    }
    return out;
  };
  let src = plane;
  let w = width;
  if (outWidth !== width) {
    const ks = weights(width, outWidth);
    const out = new Float32Array(outWidth * height);
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < outWidth; x++) {
        const [xmin, k] = ks[x];
        let ss = 0;
        for (let i = 0; i < k.length; i++) ss += src[y * w + xmin + i] * k[i];
        out[y * outWidth + x] = ss;
      }
    }
    src = out;
    w = outWidth;
  }
  if (outHeight !== height) {
    const ks = weights(height, outHeight);
    const out = new Float32Array(w * outHeight);
    for (let y = 0; y < outHeight; y++) {
      const [ymin, k] = ks[y];
      for (let x = 0; x < w; x++) {
        let ss = 0;
        for (let i = 0; i < k.length; i++) ss += src[(ymin + i) * w + x] * k[i];
        out[y * w + x] = ss;
      }
    }
    src = out;
  }
  return src;
}

function roundHalfEven(x) {   // Python's round()
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// NIfTI bytes (gunzipped) -> {width, height, grey: Uint8Array (H*W), count, index, plane, windowName}
export function readNifti(bytes, { plane = 'axial', index = null, volume = 0 } = {}) {
  if (!isNifti(bytes)) refuseNifti('not a single-file NIfTI-1/-2 (.nii or .nii.gz)');
  const h = niftiHeader(bytes);
  const ndim = h.dim[0];
  if (ndim < 2 || ndim > 4) refuseNifti(`${ndim} dimensions; expected 3 or 4`);
  const shape = [1, 2, 3].map((i) => (i <= ndim ? h.dim[i] : 1));
  const volumes = ndim === 4 ? h.dim[4] : 1;
  if (!(volume >= 0 && volume < volumes)) refuseNifti(`volume ${volume} out of range (the image has ${volumes})`);
  const type = NIFTI_TYPES[h.datatype];
  if (!type) refuseNifti(`data type code ${h.datatype} (not a greyscale integer or float)`);
  const size = { Uint8: 1, Int8: 1, Int16: 2, Uint16: 2, Int32: 4, Uint32: 4, Float32: 4, Float64: 8 }[type];
  const voxels = shape[0] * shape[1] * shape[2];
  const start = h.voxOffset + volume * voxels * size;
  if (start + voxels * size > bytes.length) refuseNifti('the voxel data is shorter than the header says');
  const view = new DataView(bytes.buffer, bytes.byteOffset + start, voxels * size);
  const scaled = Number.isFinite(h.slope) && h.slope !== 0 && !(h.slope === 1 && h.inter === 0);
  const raw = new Float32Array(voxels);   // nibabel's dataobj as float32, scl_slope / scl_inter applied
  for (let i = 0; i < voxels; i++) {
    const value = view[`get${type}`](i * size, h.little);
    raw[i] = scaled ? value * h.slope + (Number.isFinite(h.inter) ? h.inter : 0) : value;
  }
  // as_closest_canonical: canonical axis o holds source axis `from[o]`, flipped where it runs backwards
  const { orientation, norms } = niftiOrientation(niftiLinear(h));
  const from = [0, 1, 2].map((o) => orientation.findIndex(([axis]) => axis === o));
  const canonical = orientation.every(([axis, sign], j) => axis === j && sign === 1);
  const dims = from.map((s) => shape[s]);
  const zooms = canonical ? [1, 2, 3].map((i) => h.pixdim[i]) : from.map((s) => norms[s]);
  const round6 = (z) => roundHalfEven(Math.fround(z) * 1e6) / 1e6;
  const spacingOf = zooms.map((z) => round6(z));
  const sourceIndex = (xyz) => {
    const src = [0, 0, 0];
    for (let o = 0; o < 3; o++) {
      const s = from[o];
      src[s] = orientation[s][1] < 0 ? shape[s] - 1 - xyz[o] : xyz[o];
    }
    return src[0] + shape[0] * (src[1] + shape[1] * src[2]);
  };
  const finite = raw.filter((x) => Number.isFinite(x));
  if (finite.length === 0) refuseNifti('pixel data has no finite value (all NaN or infinite)');
  const sorted = Float64Array.from(finite).sort();
  const lo = numpyPercentile(sorted, 0.5);
  let hi = numpyPercentile(sorted, 99.5);
  if (hi <= lo) hi = lo + 1;
  const axis = NIFTI_PLANE_AXIS[plane];
  if (axis === undefined) refuseNifti(`plane ${plane}`);
  const count = dims[axis];
  const slice = index ?? Math.floor(count / 2);
  if (!(slice >= 0 && slice < count)) refuseNifti(`slice ${slice} out of range (${count} along ${plane})`);
  const [a, b] = [0, 1, 2].filter((i) => i !== axis);
  let height = dims[b];
  let width = dims[a];
  let unit = new Float64Array(width * height);
  for (let r = 0; r < height; r++) {
    for (let c = 0; c < width; c++) {
      const xyz = [0, 0, 0];
      xyz[axis] = slice;
      xyz[a] = dims[a] - 1 - c;   // patient right on the image's left
      xyz[b] = dims[b] - 1 - r;   // anterior / superior at the top
      const x = raw[sourceIndex(xyz)];
      const u = ((Number.isNaN(x) ? lo : x) - lo) / (hi - lo);
      unit[r * width + c] = Math.min(1, Math.max(0, u));
    }
  }
  const [row, col] = [spacingOf[b], spacingOf[a]];
  if (row > 0 && col > 0 && Math.abs(row - col) > 1e-3 * Math.max(row, col)) {
    const target = Math.min(row, col);
    const newHeight = Math.max(1, roundHalfEven(height * row / target));
    const newWidth = Math.max(1, roundHalfEven(width * col / target));
    unit = resizeFloatBilinear(Float32Array.from(unit), width, height, newWidth, newHeight);
    [width, height] = [newWidth, newHeight];
  }
  return { width, height, grey: toUint8(unit), count, index: slice, plane, windowName: 'percentile' };
}
