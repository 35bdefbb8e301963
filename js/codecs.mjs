// The page's WebAssembly DICOM decoders under Node (export/web/medical.mjs `codecLoaders`): the same npm builds the
// page vendors into its lib/, their .wasm found beside their .js by Emscripten's Node loader.
import { createRequire } from 'node:module';
import { codecLoaders } from '../export/web/medical.mjs';

const require = createRequire(import.meta.url);

export function nodeCodecs() {
  return codecLoaders({
    OpenJPEGWASM: require('@cornerstonejs/codec-openjpeg/decodewasmjs'),
    CharLSWASM: require('@cornerstonejs/codec-charls/decodewasmjs'),
  });
}
