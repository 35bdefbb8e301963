// The page's picture reading (export/web/medical.mjs) under Node, for the tests that hold it against the Python
// reader:  node js/read_pictures.mjs SIDE FILE[@PLANE]...  ->  one JSON line, per file {"file", "rgb": base64 (SIDE*SIDE*3),
// and for DICOM and NIfTI "width", "height", "window_name", "grey": base64 (H*W)} or {"file", "error"}
import { readFileSync } from 'node:fs';
import dicomParser from 'dicom-parser';
import { RawImage } from '@huggingface/transformers';
import { nodeCodecs } from './codecs.mjs';
import { gunzip, isDicom, isGzip, pictureForModel, readDicom, readNifti } from '../export/web/medical.mjs';

const [side, ...args] = process.argv.slice(2);
// FILE or FILE@PLANE (NIfTI: axial, coronal, sagittal)
const files = args.map((a) => a.split('@')[0]);
const planes = args.map((a) => a.split('@')[1]);
const out = [];
const codecs = nodeCodecs();
for (const [i, file] of files.entries()) {
  const plane = planes[i];
  try {
    const bytes = new Uint8Array(readFileSync(file));
    const image = await pictureForModel(bytes, { RawImage, dicomParser, side: Number(side), nifti: plane ? { plane } : {},
                                                 codecs, decode: (b) => RawImage.fromBlob(new Blob([b])) });
    const entry = { file, rgb: Buffer.from(image.data).toString('base64') };
    const unpacked = isGzip(bytes) ? await gunzip(bytes) : bytes;
    const grey = isDicom(bytes) ? await readDicom(bytes, dicomParser, codecs)
      : file.endsWith('.nii') || file.endsWith('.nii.gz') ? readNifti(unpacked, plane ? { plane } : {}) : null;
    if (grey) {
      Object.assign(entry, { width: grey.width, height: grey.height, window_name: grey.windowName,
                             grey: Buffer.from(grey.grey).toString('base64') });
    }
    out.push(entry);
  } catch (error) {
    out.push({ file, error: error.message });
  }
}
process.stdout.write(JSON.stringify(out) + '\n');
