// Greedy generation on a qwen-edge web bundle with onnxruntime-web's WebAssembly backend: the
// runtime transformers.js uses in browsers. Each graph's weights are handed over the way a browser
// gets them, as named data files (`X.onnx_data`, `X.onnx_data_1`, ...), as many as config.json's
// `transformers.js_config.use_external_data_format` declares. Prints the new token ids as JSON.
//
//   node wasm_greedy.mjs --model DIR --dtype q4 --ids 1,2,3 --max-new-tokens 16
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';

import * as ort from 'onnxruntime-web';

const { values: args } = parseArgs({
    options: {
        model: { type: 'string' },
        dtype: { type: 'string', default: 'fp32' },
        ids: { type: 'string' },
        'max-new-tokens': { type: 'string', default: '16' },
    },
});
if (!args.model || !args.ids) {
    console.error('usage: wasm_greedy.mjs --model DIR [--dtype D] --ids 1,2,3 [--max-new-tokens N]');
    process.exit(2);
}
const SUFFIX = { fp32: '', fp16: '_fp16', q8: '_quantized', q4: '_q4', q4f16: '_q4f16' };
const config = JSON.parse(fs.readFileSync(path.join(args.model, 'config.json'), 'utf8'));
const declared = config['transformers.js_config']?.use_external_data_format ?? {};
ort.env.wasm.numThreads = 1;

async function openGraph(base) {
    const file = `${base}${SUFFIX[args.dtype]}.onnx`;
    const dir = path.join(args.model, 'onnx');
    const chunks = Number(declared[file] ?? 0);
    const externalData = Array.from({ length: chunks }, (_, i) => {
        const name = `${file}_data${i === 0 ? '' : `_${i}`}`;
        return { path: name, data: fs.readFileSync(path.join(dir, name)) };
    });
    return ort.InferenceSession.create(fs.readFileSync(path.join(dir, file)), {
        executionProviders: ['wasm'],
        externalData,
    });
}

const embed = await openGraph('embed_tokens');
const decoder = await openGraph('decoder_model_merged');

// Empty state: every symbolic dim is 0 except the batch (1), as transformers.js builds it.
const state = {};
for (const meta of decoder.inputMetadata) {
    if (!meta.name.startsWith('past_')) continue;
    const shape = meta.shape.map((d) => (typeof d === 'number' ? d : d === 'batch_size' ? 1 : 0));
    const Data = { float32: Float32Array, float16: Uint16Array }[meta.type];
    state[meta.name] = new ort.Tensor(meta.type, new Data(shape.reduce((a, b) => a * b, 1)), shape);
}

const int64 = (values, dims) => new ort.Tensor('int64', BigInt64Array.from(values, BigInt), dims);

async function step(ids, past) {
    const { inputs_embeds } = await embed.run({ input_ids: int64(ids, [1, ids.length]) });
    const positions = ids.map((_, i) => past + i);
    const out = await decoder.run({
        inputs_embeds,
        attention_mask: int64(new Array(past + ids.length).fill(1), [1, past + ids.length]),
        position_ids: int64([...positions, ...positions, ...positions], [3, 1, ids.length]),
        ...state,
    });
    for (const name of Object.keys(out)) {
        if (name.startsWith('present.')) state[name.replace('present.', 'past_key_values.')] = out[name];
        else if (name.startsWith('present_')) state[name.replace('present_', 'past_')] = out[name];
    }
    const [, rows, vocab] = out.logits.dims;
    const last = out.logits.data.subarray((rows - 1) * vocab, rows * vocab);
    let best = 0;
    for (let v = 1; v < vocab; ++v) if (last[v] > last[best]) best = v;
    return best;
}

const promptIds = args.ids.split(',').map((x) => Number.parseInt(x, 10));
const generated = [];
let next = await step(promptIds, 0);
const maxNew = Number.parseInt(args['max-new-tokens'], 10);
while (generated.length < maxNew) {
    generated.push(next);
    if (generated.length === maxNew) break;
    next = await step([next], promptIds.length + generated.length - 1);
}
console.log(JSON.stringify({ ort_web_version: ort.env.versions?.web ?? null, generated_ids: generated }));
