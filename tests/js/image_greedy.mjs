// Loads a qwen-edge web bundle that carries a vision encoder as transformers.js's image-text-to-text
// model (Node, CPU, local files only) and generates greedily for one image and a chat prompt.
// Prints one JSON object: prompt ids, new token ids, the image grid.
//
//   node image_greedy.mjs --model DIR --image FILE --prompt TEXT [--dtype fp32] [--max-new-tokens 16]
import path from 'node:path';
import { parseArgs } from 'node:util';

import { AutoModelForImageTextToText, AutoProcessor, RawImage, env } from '@huggingface/transformers';

const { values: args } = parseArgs({
    options: {
        model: { type: 'string' },
        image: { type: 'string' },
        prompt: { type: 'string' },
        dtype: { type: 'string' },
        'max-new-tokens': { type: 'string', default: '16' },
    },
});
const modelDir = path.resolve(args.model);
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(modelDir) + path.sep;
const modelId = path.basename(modelDir);

const processor = await AutoProcessor.from_pretrained(modelId);
const model = await AutoModelForImageTextToText.from_pretrained(modelId, { dtype: args.dtype, device: 'cpu' });
const messages = [{ role: 'user', content: [{ type: 'image' }, { type: 'text', text: args.prompt }] }];
const text = processor.apply_chat_template(messages, { add_generation_prompt: true });
const inputs = await processor(text, await RawImage.read(path.resolve(args.image)));
const promptIds = Array.from(inputs.input_ids.data, Number);
const sequences = await model.generate({
    ...inputs,
    max_new_tokens: Number.parseInt(args['max-new-tokens'], 10),
    do_sample: false,
});
await model.dispose();
console.log(
    JSON.stringify({
        prompt_ids: promptIds,
        generated_ids: Array.from(sequences.data.slice(promptIds.length), Number),
        image_grid_thw: inputs.image_grid_thw.tolist().map((row) => row.map(Number)),
        eos_token_id: model.generation_config?.eos_token_id ?? null,
    }),
);
