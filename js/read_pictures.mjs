// The page's picture reading (export/web/medical.mjs) under Node, for the tests that hold it against the Python
// reader:  node js/read_pictures.mjs SIDE FILE...  ->  one JSON line, per file {"file", "rgb": base64 (SIDE*SIDE*3),
// and for DICOM "width", "height", "window_name", "grey": base64 (H*W)} or {"file", "error"}
import { readFileSync } from 'node:fs';
import dicomParser from 'dicom-parser';
import { RawImage } from '@huggingface/transformers';
import { isDicom, pictureForModel, readDicom } from '../export/web/medical.mjs';

const [side, ...files] = process.argv.slice(2);
const out = [];
for (const file of files) {
  try {
    const bytes = new Uint8Array(readFileSync(file));
    const image = await pictureForModel(bytes, { RawImage, dicomParser, side: Number(side),
                                                 decode: (b) => RawImage.fromBlob(new Blob([b])) });
    const entry = { file, rgb: Buffer.from(image.data).toString('base64') };
    if (isDicom(bytes)) {
      const dicom = readDicom(bytes, dicomParser);
      Object.assign(entry, { width: dicom.width, height: dicom.height, window_name: dicom.windowName,
                             grey: Buffer.from(dicom.grey).toString('base64') });
    }
    out.push(entry);
  } catch (error) {
    out.push({ file, error: error.message });
  }
}
process.stdout.write(JSON.stringify(out) + '\n');
