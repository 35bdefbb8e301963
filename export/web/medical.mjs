// Pictures for the model, read in JavaScript with the Python reader's rules, so the browser page and Node see the
// pixels `gmaivl-rt ask` sees (gmaivl_rt/medical/dicom.py + windowing.py, gmaivl_rt/model/preprocess.py):
//   DICOM  uncompressed greyscale (Explicit/Implicit VR Little Endian, Explicit VR Big Endian), first frame:
//          Modality LUT (rescale slope/intercept), then the file's window (VOI LUT function LINEAR, LINEAR_EXACT,
//          SIGMOID), else a named CT window by body part (abdomen by default), else the 0.5-99.5 percentiles;
//          MONOCHROME1 inverted; [0, 1] -> uint8 as numpy rounds (half to even, float32).
//   then   LLaVA's expand2square (pad with the CLIP mean colour) and PIL's bicubic resize to the model's square.
// What the Python reader does and this does not (compressed transfer syntaxes, VOI LUT / Modality LUT sequences,
// colour and palette DICOM, non-square pixel spacing, NIfTI) is refused with the reason: ask the server instead.

export const CT_WINDOWS = { lung: [-600, 1500], mediastinum: [50, 350], bone: [400, 1800], brain: [40, 80],
                            abdomen: [40, 400] };
export const CT_WINDOW_BY_BODY_PART = {
  head: 'brain', brain: 'brain', skull: 'bone', chest: 'mediastinum', thorax: 'mediastinum', lung: 'lung',
  abdomen: 'abdomen', pelvis: 'abdomen', liver: 'abdomen', spine: 'bone', cspine: 'bone', tspine: 'bone',
  lspine: 'bone', extremity: 'bone',
};
export const CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073];
const UNCOMPRESSED = { '1.2.840.10008.1.2': true, '1.2.840.10008.1.2.1': true, '1.2.840.10008.1.2.2': false };

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

// DICOM bytes -> {width, height, grey: Uint8Array (H*W), window: [c, w] | null, windowName}
export function readDicom(bytes, dicomParser) {
  let ds;
  try {
    ds = dicomParser.parseDicom(bytes);
  } catch (error) {
    refuse(`not a readable DICOM file (${error.exception ?? error.message ?? error})`);
  }
  const syntax = (ds.string('x00020010') || '').replace(/\0/g, '').trim();
  if (!(syntax in UNCOMPRESSED)) refuse(`transfer syntax ${syntax || 'missing'} is compressed or not supported here`);
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
  if (pixel.length < count * (bits / 8)) refuse('pixel data shorter than one frame');
  const view = new DataView(bytes.buffer, bytes.byteOffset + pixel.dataOffset, count * (bits / 8));
  const little = UNCOMPRESSED[syntax];
  const values = new Float64Array(count);
  for (let i = 0; i < count; i++) {
    let v;
    if (bits === 8) v = signed ? view.getInt8(i) : view.getUint8(i);
    else if (bits === 16) v = signed ? view.getInt16(2 * i, little) : view.getUint16(2 * i, little);
    else v = signed ? view.getInt32(4 * i, little) : view.getUint32(4 * i, little);
    if (signed && stored < bits) { // pydicom sign-extends from BitsStored
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
export function dicomForModel(bytes, dicomParser, side) {
  const image = readDicom(bytes, dicomParser);
  const square = expandToSquare(greyToRgb(image.grey), image.width, image.height);
  return { ...image, rgb: resizeBicubic(square.rgb, square.side, square.side, side, side), side };
}

// Any picture -> RGB uint8 at the model's square, the way gmaivl_rt preprocesses it: DICOM by `dicomForModel`,
// other files decoded by transformers.js' RawImage (PNG, JPEG, ...), then expand2square and PIL's bicubic.
// Returns a RawImage of side x side, which transformers.js' processor then only rescales and normalises.
export async function pictureForModel(bytes, { RawImage, dicomParser, side, decode }) {
  if (isDicom(bytes)) {
    const { rgb } = dicomForModel(bytes, dicomParser, side);
    return new RawImage(rgb, side, side, 3);
  }
  const image = (await decode(bytes)).rgb();
  const square = expandToSquare(new Uint8Array(image.data), image.width, image.height);
  return new RawImage(resizeBicubic(square.rgb, square.side, square.side, side, side), side, side, 3);
}
