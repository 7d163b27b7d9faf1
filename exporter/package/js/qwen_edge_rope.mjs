// Shipped in every qwen-edge web bundle. transformers.js 4.3.x computes the text-only multimodal-RoPE
// delta of Qwen VL / Qwen3.5 models as max(position) + 1 + prompt_length, where Hugging Face
// transformers (and the model's training) use max(position) + 1 - prompt_length: prefill positions
// are right, but every decode step then runs at past + 2 * prompt_length and greedy output drifts.
// (Image prompts take another path, which computes the delta right.)
//
//   import { fixTextRopeDelta } from './my-bundle/qwen_edge_rope.mjs';
//   fixTextRopeDelta(model);   // after from_pretrained; returns whether the fix was needed
//
// It installs the reference rule only when the library's delta for an unpadded 3-token prompt is
// not 0, so a fixed transformers.js release runs unmodified. The module imports nothing: the
// library's rule reads only `data` and `dims` of its inputs, and its result carries its Tensor class.
export function fixTextRopeDelta(model) {
    if (typeof model._get_text_only_rope_index !== 'function') return false;
    const libraryRule = model._get_text_only_rope_index.bind(model);
    const probe = { data: new BigInt64Array(3).fill(1n), dims: [1, 3], type: 'int64', size: 3 };
    const [positions, delta] = libraryRule(probe, probe);
    if (Number(delta.data[0]) === 0) return false;
    const Tensor = positions.constructor;
    model._get_text_only_rope_index = (input_ids, attention_mask) => {
        const [positionIds, wrongDeltas] = libraryRule(input_ids, attention_mask);
        if (!attention_mask) return [positionIds, wrongDeltas];
        const length = BigInt(attention_mask.dims[1]);
        const deltas = Array.from(wrongDeltas.data, (d) => d - 2n * length);
        return [positionIds, new Tensor('int64', BigInt64Array.from(deltas), wrongDeltas.dims)];
    };
    return true;
}
