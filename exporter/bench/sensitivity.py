"""Benchmark: how much each weight family suffers from int4, and the mixed recipe that meets the q4
gate with the fewest bytes.

    .venv/bin/python -m exporter.bench.sensitivity [--tokens 4096]

Sweep: per family (quant/schemes.py `FAMILIES`), the default model exported to ONNX with only that
family compressed, at int4 in blocks of 32 and of 128, each scored against the PyTorch reference on
held-out text (mean KL, top-1 agreement), each window of 128 tokens in one call with every position's
logits (the same weights as the decode path, 128 times fewer calls; `verify` re-checks the result
token by token). Search: the sweep ranks the families; candidates put the LM head in each of
`HEAD_FORMATS` and the k most sensitive other families at int4/b32 (k = 0..`MAX_FINE`), the rest at
int4/b128; all are measured in one round and the cheapest that meets the q4 gate wins. (A greedy
search, one family per round by KL per byte, was tried first: under load each round took minutes and
it spent them on the smallest families, whose sweep KL is noise-level.) Bytes are those of the qwen3.5-0.8b shape (the size target's), in
MatMulNBits layout (quant/onnx_weights.py `packed_bytes`); quality is the default model's, the only
trained one here. Results go into BENCHMARKS.md; the recipe found is `q4mix` in quant/schemes.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import tempfile
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from default_model import CHECKPOINT_DIR, HELDOUT_TEXT
from exporter.bench.export import ROOT, machine, replace_section
from exporter.onnx.backend import OnnxBackend, OnnxOptions, Traced
from exporter.pipeline import ExportRequest, run_export
from exporter.progress import Stages
from exporter.verify.quality import Scorer, VariantQuality, checkpoint_scorer, score_variants, variant_scorer
from graphs.checkpoint import Checkpoint, expected_shapes
from graphs.config import preset_config_dict, text_config_from_dict
from quant.onnx_weights import packed_bytes
from quant.schemes import FAMILIES, HEAD_FAMILY, SCHEMES, QuantOptions, Scheme, WeightFormat, family_of
from runtime_py.tokenizer import TextTokenizer

SIZE_PRESET = "qwen3.5-0.8b"
CHEAP, FINE = WeightFormat(4, 128), WeightFormat(4, 32)  # int4 blocks: fewest bytes, best quality
HEAD_FORMATS = (WeightFormat(4, 128), WeightFormat(4, 64), WeightFormat(4, 32), WeightFormat(8, 128))
MAX_FINE = 4
SWEEP_FORMATS = (FINE, CHEAP)
Recipe = dict[str, WeightFormat | None]


class TracedOnce(OnnxBackend):
    """The ONNX backend with the float graphs traced once, in memory, and reused by every later
    export (only the int transform differs between recipes; `write_variant` works on a copy)."""

    def __init__(self, options: OnnxOptions) -> None:
        super().__init__(replace(options, stream_weights=False))
        self.traced: dict[str, Traced] = {}

    def prepare(self, checkpoint: Checkpoint, activations: str, folder: Path, stages: Stages) -> Traced:
        if activations not in self.traced:
            self.traced[activations] = super().prepare(checkpoint, activations, folder, stages)
        else:
            stages.run(lambda: None)  # the trace stage, already done
        return self.traced[activations]

    def release(self, traced: Traced) -> None:
        """Kept for the next recipe."""


def family_shapes(cfg_dict: dict) -> dict[str, list[tuple[int, int]]]:
    """{family: [(K, N) of each of its weights]} of a config (a torch weight is [N, K])."""
    shapes: dict[str, list[tuple[int, int]]] = {}
    for param, shape in expected_shapes(text_config_from_dict(cfg_dict)).items():
        if (family := family_of(param)) is not None:
            shapes.setdefault(family, []).append((shape[1], shape[0]))
    return shapes


def recipe_bytes(recipe: Recipe, shapes: dict[str, list[tuple[int, int]]]) -> int:
    """Bytes of the compressed families' weights (a float family counts its fp32 bytes)."""
    total = 0
    for family, weights in shapes.items():
        fmt = recipe.get(family)
        total += sum(packed_bytes(k, n, fmt) if fmt else 4 * k * n for k, n in weights)
    return total


def recipe_scheme(label: str, recipe: Recipe) -> Scheme:
    """An ad-hoc int scheme holding `recipe`, gated like q4, for measuring (never offered by --quant)."""
    return Scheme(label, f"_{label}", "float32", 4, SCHEMES["q4"].gate, f"measured recipe {label}", True, "int4-mixed",
                  recipe=tuple(recipe.items()))


def describe(recipe: Recipe) -> str:
    return ", ".join(f"{family} {fmt or 'float'}" for family, fmt in recipe.items())


class Measurer:
    """Exports recipes of the default model and scores them on `ids` against the cached reference."""

    def __init__(self, ids: list[int], work: Path, greedy_prompts: int = 0) -> None:
        self.ids, self.work, self.greedy_prompts, self.rounds = ids, work, greedy_prompts, 0
        self.backend = TracedOnce(OnnxOptions("contrib", all_logits=True))
        logits, greedy = checkpoint_scorer(CHECKPOINT_DIR)
        self.reference: Scorer = (lru_cache(maxsize=None)(lambda w: logits(list(w))),
                                  lru_cache(maxsize=None)(lambda p, n: greedy(list(p), n)))

    def measure(self, recipes: dict[str, Recipe]) -> dict[str, VariantQuality]:
        self.rounds += 1
        out = self.work / f"round{self.rounds}"
        schemes = tuple(recipe_scheme(label, r) for label, r in recipes.items())
        run_export(ExportRequest("default", out, schemes, force=True, progress=False), self.backend)
        logits, greedy = self.reference
        reference = (lambda ids: logits(tuple(ids)), lambda prompt, n: greedy(tuple(prompt), n))
        scorers = {s.name: variant_scorer(out, s.name) for s in schemes}
        results = score_variants(reference, scorers, {s.name: s.gate for s in schemes}, self.ids,
                                 greedy_prompts=self.greedy_prompts)
        shutil.rmtree(out)
        return {q.variant: q for q in results}


def sweep(measurer: Measurer) -> dict[tuple[str, str], VariantQuality]:
    """{(family, format): quality} with that family alone compressed."""
    recipes = {f"{family}-{fmt}".replace("/", ""): {f: (fmt if f == family else None) for f in FAMILIES}
               for family in FAMILIES for fmt in SWEEP_FORMATS}
    measured = measurer.measure(recipes)
    return {(family, str(fmt)): measured[f"{family}-{fmt}".replace("/", "")] for family in FAMILIES
            for fmt in SWEEP_FORMATS}


def candidates(sweep_results: dict[tuple[str, str], VariantQuality]) -> dict[str, Recipe]:
    """Recipes built from the sweep: the LM head (with the tied embedding) in each of `HEAD_FORMATS`,
    and the k most int4-sensitive other families (KL when alone at the cheap block) at the fine block,
    k = 0..`MAX_FINE`; every other family at the cheap block."""
    others = sorted((f for f in FAMILIES if f != HEAD_FAMILY), key=lambda f: -sweep_results[(f, str(CHEAP))].mean_kl)
    out = {}
    for head in HEAD_FORMATS:
        for k in range(MAX_FINE + 1):
            recipe = {f: CHEAP for f in FAMILIES} | {f: FINE for f in others[:k]} | {HEAD_FAMILY: head}
            out[f"head-{head}-fine{k}".replace("/", "")] = recipe
    return out


def search(measurer: Measurer, shapes: dict, sweep_results: dict) -> tuple[Recipe, list[dict]]:
    """Every candidate measured in one round; the one that meets the q4 gate with the fewest bytes."""
    recipes = candidates(sweep_results)
    measured = measurer.measure(recipes)
    trace = sorted(({"change": describe_short(r), "bytes": recipe_bytes(r, shapes), "quality": measured[label],
                     "recipe": r} for label, r in recipes.items()), key=lambda step: step["bytes"])
    passing = [step for step in trace if step["quality"].passed]
    if not passing:
        raise SystemExit("no candidate recipe meets the q4 gate")
    return passing[0]["recipe"], trace


def describe_short(recipe: Recipe) -> str:
    """'lm_head int8/b128; down_proj, in_proj_qkv int4/b32; rest int4/b128'."""
    fine = [f for f in FAMILIES if f != HEAD_FAMILY and recipe[f] == FINE]
    return f"lm_head {recipe[HEAD_FAMILY]}; " + (f"{', '.join(fine)} {FINE}; " if fine else "") + f"rest {CHEAP}"


def _row(q: VariantQuality) -> str:
    return f"{q.mean_kl:.2e} | {q.top1_agreement:.2%} | {q.perplexity_increase:+.2%}"


def write_section(doc: Path, tokens: int, sweep_results: dict, shapes: dict, trace: list[dict], recipe: Recipe,
                  final: VariantQuality) -> None:
    q4_bytes = recipe_bytes({f: WeightFormat(4, 32) for f in FAMILIES}, shapes)
    sweep_rows = "\n".join(
        f"| {family} | {sum(k * n for k, n in shapes[family]) / 1e6:.1f} | "
        + " | ".join(f"{q.mean_kl:.2e} | {q.top1_agreement:.2%}"
                     for q in (sweep_results[(family, str(fmt))] for fmt in SWEEP_FORMATS)) + " |"
        for family in FAMILIES)
    search_rows = "\n".join(f"| {n} | {step['change']} | {step['bytes'] / 1e6:.1f} | {_row(step['quality'])} | "
                            f"{'pass' if step['quality'].passed else 'fail'} |" for n, step in enumerate(trace))
    in_table = SCHEMES.get("q4mix")
    matches = in_table is not None and recipe == {f: in_table.weight_format(_any_param(f), QuantOptions(32))
                                                  for f in FAMILIES}
    gate = SCHEMES["q4"].gate
    body = f"""## Int4 sensitivity per weight family, and the q4mix recipe

Measured {dt.date.today().isoformat()} on {machine()} (shared machine; quality does not depend on load).
Command: `.venv/bin/python -m exporter.bench.sensitivity --tokens {tokens}`: the default model exported to
ONNX (contrib ops, all-position logits) once per recipe, each scored against the PyTorch fp32 reference
on the first {tokens} tokens of `default_model/heldout.txt` in windows of 128 tokens ({final.positions} positions). Bytes: the compressed
weights of the {SIZE_PRESET} shape in MatMulNBits layout (int data + one fp32 scale per block); float
tensors, which no recipe changes, are left out. Parameters in millions, of the {SIZE_PRESET} shape.

Sweep, one family alone compressed (every other weight float):

| family | {SIZE_PRESET} params (M) | KL, int4/b32 | top-1, int4/b32 | KL, int4/b128 | top-1, int4/b128 |
|---|---|---|---|---|---|
{sweep_rows}

Search (candidates from the sweep: the LM head and tied embedding in each format, the k most
sensitive other families at {FINE}, k = 0..{MAX_FINE}, the rest at {CHEAP}; by bytes; the q4 gate is
top-1 ≥ {gate.min_top1:.0%}, KL ≤ {gate.max_kl:g}, Δppl ≤ {gate.max_ppl_increase:.0%}; the cheapest that passes wins):

| # | recipe | {SIZE_PRESET} bytes (MB) | mean KL | top-1 | Δppl | q4 gate |
|---|---|---|---|---|---|---|
{search_rows}

Result: {describe(recipe)}: {recipe_bytes(recipe, shapes) / 1e6:.1f} MB of compressed weights on the
{SIZE_PRESET} shape against {q4_bytes / 1e6:.1f} MB for q4 (every family int4/b32). Re-measured with
greedy prompts: {_row(final)} (mean KL, top-1, Δppl), greedy agreement {final.greedy_agreement:.1%}.
`q4mix` in `quant/schemes.py` {'is this recipe' if matches else 'is NOT this recipe: update it'}.
"""
    replace_section(doc, "sensitivity:default", body)
    print(body)


def _any_param(family: str) -> str:
    """One decoder parameter name of a family (for asking a scheme about the family)."""
    return "lm_head.weight" if family == "lm_head" else f"layers.0.x.{family}.weight"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    ids = TextTokenizer(CHECKPOINT_DIR).encode(HELDOUT_TEXT.read_text())[: args.tokens]
    shapes = family_shapes(preset_config_dict(SIZE_PRESET))
    with tempfile.TemporaryDirectory(prefix="sensitivity-") as work:
        measurer = Measurer(ids, Path(work))
        sweep_results = sweep(measurer)
        for (family, fmt), q in sweep_results.items():
            print(f"sweep {family:12s} {fmt:10s} KL {q.mean_kl:.3e} top-1 {q.top1_agreement:.2%}", flush=True)
        recipe, trace = search(measurer, shapes, sweep_results)
        measurer.greedy_prompts = 4
        final = measurer.measure({"result": recipe})["result"]
    write_section(args.out, args.tokens, sweep_results, shapes, trace, recipe, final)


if __name__ == "__main__":
    main()
