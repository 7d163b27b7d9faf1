// Loads a qwen-edge web bundle with transformers.js (Node, CPU, local files only) and generates
// greedily. Prints one JSON object: the prompt ids, the new token ids, and load/generate seconds.
//
//   node generate.mjs --model DIR [--dtype q4] --max-new-tokens 24 (--ids 1,2,3 | --prompt TEXT [--chat])
//
// The bundle is loaded the way a web app would load it, through AutoModelForCausalLM and
// AutoTokenizer with remote models disabled, so a missing file or a wrong config field fails here.
import path from 'node:path';
import { parseArgs } from 'node:util';

import { pathToFileURL } from 'node:url';

import { AutoModelForCausalLM, AutoTokenizer, Tensor, env } from '@huggingface/transformers';

const { values: args } = parseArgs({
    options: {
        model: { type: 'string' },
        dtype: { type: 'string' }, // omitted: the bundle's default (config.json transformers.js_config.dtype)
        'max-new-tokens': { type: 'string', default: '24' },
        ids: { type: 'string' },
        prompt: { type: 'string' },
        chat: { type: 'boolean', default: false },
    },
});
if (!args.model || (args.ids === undefined) === (args.prompt === undefined)) {
    console.error('usage: generate.mjs --model DIR [--dtype D] [--max-new-tokens N] (--ids 1,2 | --prompt T [--chat])');
    process.exit(2);
}

const modelDir = path.resolve(args.model);
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(modelDir) + path.sep;
const modelId = path.basename(modelDir);

const loadStart = performance.now();
const tokenizer = await AutoTokenizer.from_pretrained(modelId);
const model = await AutoModelForCausalLM.from_pretrained(modelId, { dtype: args.dtype, device: 'cpu' });
const loadSeconds = (performance.now() - loadStart) / 1000;
// The text-position fix an app installs, imported from the bundle itself (README, Web bundle).
const { fixTextRopeDelta } = await import(pathToFileURL(path.join(modelDir, 'qwen_edge_rope.mjs')).href);
const ropeDeltaFixed = fixTextRopeDelta(model);

let promptIds;
if (args.ids !== undefined) {
    promptIds = args.ids.split(',').map((x) => Number.parseInt(x, 10));
} else {
    const text = args.chat
        ? tokenizer.apply_chat_template([{ role: 'user', content: args.prompt }], {
              tokenize: false,
              add_generation_prompt: true,
          })
        : args.prompt;
    promptIds = tokenizer.encode(text, { add_special_tokens: false });
}

const inputIds = new Tensor('int64', BigInt64Array.from(promptIds, BigInt), [1, promptIds.length]);
const attentionMask = new Tensor('int64', new BigInt64Array(promptIds.length).fill(1n), [1, promptIds.length]);

const generateStart = performance.now();
const sequences = await model.generate({
    input_ids: inputIds,
    attention_mask: attentionMask,
    max_new_tokens: Number.parseInt(args['max-new-tokens'], 10),
    do_sample: false,
});
const generateSeconds = (performance.now() - generateStart) / 1000;

const generated = Array.from(sequences.data.slice(promptIds.length), Number);
await model.dispose();
console.log(
    JSON.stringify({
        prompt_ids: promptIds,
        generated_ids: generated,
        eos_token_id: model.generation_config?.eos_token_id ?? null,
        text_rope_delta_fixed: ropeDeltaFixed,
        load_seconds: loadSeconds,
        generate_seconds: generateSeconds,
    }),
);
