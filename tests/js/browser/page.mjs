// Runs a qwen-edge web bundle in a real browser page with transformers.js's browser build on the
// WebAssembly backend, the way a web app would: a text prompt (with the bundle's rope fix) and an
// image prompt, greedy. The result is POSTed to /result (the test's server) and shown on the page.
//
//   index.html?bundle=NAME&image=/images/square.png&prompt=TEXT&max=16
// served with /tjs/ = transformers.js dist, /ort/ = onnxruntime-web dist, /models/NAME = the bundle.
import { AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, RawImage, Tensor, env }
    from '/tjs/transformers.js';

const params = new URLSearchParams(location.search);
const bundle = params.get('bundle');
const maxNewTokens = Number.parseInt(params.get('max') ?? '16', 10);
const report = async (body) => {
    document.getElementById('result').textContent = JSON.stringify(body);
    await fetch('/result', { method: 'POST', body: JSON.stringify(body) });
};

try {
    env.allowRemoteModels = false;
    env.allowLocalModels = true;
    env.localModelPath = '/models/';
    env.useBrowserCache = false;
    env.backends.onnx.wasm.wasmPaths = {
        mjs: '/ort/ort-wasm-simd-threaded.asyncify.mjs',
        wasm: '/ort/ort-wasm-simd-threaded.asyncify.wasm',
    };
    env.backends.onnx.wasm.numThreads = 1;
    const { fixTextRopeDelta } = await import(`/models/${bundle}/qwen_edge_rope.mjs`);
    const options = { dtype: params.get('dtype') ?? 'fp32', device: 'wasm' };

    // text prompt, chat template
    const tokenizer = await AutoTokenizer.from_pretrained(bundle);
    const textModel = await AutoModelForCausalLM.from_pretrained(bundle, options);
    const fixed = fixTextRopeDelta(textModel);
    const text = tokenizer.apply_chat_template([{ role: 'user', content: params.get('prompt') }],
                                               { tokenize: false, add_generation_prompt: true });
    const ids = tokenizer.encode(text, { add_special_tokens: false });
    const textOut = await textModel.generate({
        input_ids: new Tensor('int64', BigInt64Array.from(ids, BigInt), [1, ids.length]),
        attention_mask: new Tensor('int64', new BigInt64Array(ids.length).fill(1n), [1, ids.length]),
        max_new_tokens: maxNewTokens, do_sample: false,
    });
    await textModel.dispose();

    // image prompt
    let image = null;
    if (params.get('image')) {
        const processor = await AutoProcessor.from_pretrained(bundle);
        const model = await AutoModelForImageTextToText.from_pretrained(bundle, options);
        const messages = [{ role: 'user', content: [{ type: 'image' }, { type: 'text', text: params.get('prompt') }] }];
        const chat = processor.apply_chat_template(messages, { add_generation_prompt: true });
        const inputs = await processor(chat, await RawImage.fromURL(params.get('image')));
        const out = await model.generate({ ...inputs, max_new_tokens: maxNewTokens, do_sample: false });
        const n = inputs.input_ids.dims[1];
        image = { prompt_ids: Array.from(inputs.input_ids.data, Number),
                  generated_ids: Array.from(out.data.slice(n), Number) };
        await model.dispose();
    }
    await report({
        ok: true, backend: 'wasm', user_agent: navigator.userAgent, text_rope_delta_fixed: fixed,
        text: { prompt_ids: ids, generated_ids: Array.from(textOut.data.slice(ids.length), Number) }, image,
    });
} catch (error) {
    await report({ ok: false, error: String(error?.stack ?? error) });
}
