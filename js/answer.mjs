// Answers questions about images with a `gmaivl-rt export onnx --layout transformers.js` folder, in transformers.js
// under Node (onnxruntime-node, CPU), as a user of the library would: AutoProcessor + LlavaForConditionalGeneration,
// local files only. Greedy decoding. Pictures (PNG, JPEG, uncompressed greyscale DICOM) are read as the browser
// page reads them (export/web/medical.mjs: the Python reader's windowing, expand2square, PIL's bicubic).
//
//   node js/answer.mjs REQUEST.json   ->  one JSON line on stdout: {"answers": [{"tokens": [...], "text": "..."}]}
// REQUEST.json: {"model": DIR, "dtype": "fp32" | "q8" | "q4" | "q4f16" | {graph: dtype}, "max_new_tokens": N,
//                "items": [{"question": str, "image": PATH}]}
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { AutoProcessor, LlavaForConditionalGeneration, RawImage, env } from '@huggingface/transformers';
import dicomParser from 'dicom-parser';
import { pictureForModel } from '../export/web/medical.mjs';
import { nodeCodecs } from './codecs.mjs';

const request = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const dir = path.resolve(request.model);
env.allowRemoteModels = false;          // nothing leaves the machine
env.allowLocalModels = true;
env.localModelPath = path.dirname(dir);
const name = path.basename(dir);

const processor = await AutoProcessor.from_pretrained(name, { local_files_only: true });
const model = await LlavaForConditionalGeneration.from_pretrained(name, {
  local_files_only: true, dtype: request.dtype ?? 'fp32', device: 'cpu',
});

const codecs = nodeCodecs();
const answers = [];
for (const item of request.items) {
  const messages = [{ role: 'user', content: `<image>\n${item.question}` }];
  const prompt = processor.tokenizer.apply_chat_template(messages, { tokenize: false, add_generation_prompt: true });
  const side = processor.image_processor.config.size.height;
  const image = await pictureForModel(new Uint8Array(readFileSync(path.resolve(item.image))), {
    RawImage, dicomParser, side, codecs, decode: (bytes) => RawImage.fromBlob(new Blob([bytes])),
  });
  const inputs = await processor(image, prompt);
  const output = await model.generate({ ...inputs, max_new_tokens: request.max_new_tokens ?? 24, do_sample: false,
                                        repetition_penalty: 1.0 });
  const promptLength = inputs.input_ids.dims.at(-1);
  const tokens = Array.from(output.slice(null, [promptLength, null]).data, Number);
  answers.push({ tokens, text: processor.tokenizer.decode(tokens, { skip_special_tokens: true }) });
}
process.stdout.write(JSON.stringify({ answers }) + '\n');
