"""The targets of bench/gpu_check.sh, met or not, from the results.jsonl it wrote.

    python -m bench.gpu_summary runs/gpu_check

One line per target: PASS, FAIL or MISSING (the part did not run, timed out or printed no
record), with the numbers behind it. Run by gpu_check.sh last; also on its own, on a copied folder.
"""
import json
from pathlib import Path

from llama.cli import run_cli
from llama.errors import BadInput


def read_results(folder) -> list:
    path = Path(folder) / "results.jsonl"
    if not path.is_file():
        raise BadInput(f"{path} does not exist: give the folder bench/gpu_check.sh wrote")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


class Results:
    def __init__(self, records):
        self.records = records

    def find(self, part, **fields):
        """The first record of `part` whose fields have these values (None if there is none)."""
        for record in self.records:
            if record.get("part") == part and all(record.get(k) == v for k, v in fields.items()):
                return record
        return None

    def status(self, part) -> str:
        """How the part ended: ok, timed out, exit N, or not run."""
        ends = [r for r in self.records if r.get("part") == part and "status" in r]
        return ends[-1]["status"] if ends else "not run"

    def missing(self, part) -> str:
        return f"MISSING  ({part}: {self.status(part)}; see {part}.log)"


def verdict(ok: bool) -> str:
    return "PASS   " if ok else "FAIL   "


def training_vs_peft(results, part):
    ratio = results.find(part, bench="train_ratio")
    if ratio is None:
        skipped = results.find(part, impl="hf_peft")
        why = f" ({skipped['skipped']})" if skipped and "skipped" in skipped else ""
        return results.missing(part) + why
    ok = ratio["tokens_per_s_ratio"] >= 1.3 and \
        ratio["ours_max_stage_peak_gib"] <= ratio["other_max_stage_peak_gib"]
    return (f"{verdict(ok)}  ours / PEFT tokens/s {ratio['tokens_per_s_ratio']:.2f} (target >= 1.3), "
            f"peak {ratio['ours_max_stage_peak_gib']:.2f} vs {ratio['other_max_stage_peak_gib']:.2f} GiB")


def stage_peaks(results, part, limit_gib=None):
    record = results.find(part, bench="train", impl="ours")
    if record is None or "error" in record:
        return results.missing(part)
    peaks = record["peak_mem_gib"]
    shown = "/".join(f"{p:.2f}" for p in peaks)
    if limit_gib is None:
        return f"{verdict(True)}  finished; stage peaks {shown} GiB"
    return f"{verdict(max(peaks) <= limit_gib)}  stage peaks {shown} GiB (target each <= {limit_gib})"


def decode_targets(results):
    graph = results.find("decode_graph", bench="decode", impl="ours")
    if graph is None:
        return [("decode: graph share of bandwidth", results.missing("decode_graph"))]
    share = graph.get("bandwidth_share") or 0.0
    lines = [("decode: graph share of bandwidth",
              f"{verdict(share >= 0.75)}  {share:.0%} of the limit (target >= 75%), mode "
              f"{graph.get('mode')}, {graph['decode_tokens_per_s']:.1f} tokens/s")]
    vs_hf = results.find("decode_graph", bench="decode_ratio")
    lines.append(("decode: graph / generate",
                  f"{verdict(vs_hf['tokens_per_s_ratio'] >= 10)}  {vs_hf['tokens_per_s_ratio']:.1f}x "
                  "(target >= 10x)" if vs_hf and vs_hf.get("tokens_per_s_ratio")
                  else results.missing("decode_graph") + " (no transformers comparison)"))
    two = results.find("decode_graph_2stages", bench="decode_ratio")
    lines.append(("decode: 2 stages / 1 stage",
                  f"{verdict(two['tokens_per_s_ratio'] >= 0.9)}  {two['tokens_per_s_ratio']:.2f} "
                  "(target >= 0.90)" if two and two.get("tokens_per_s_ratio")
                  else results.missing("decode_graph_2stages")))
    return lines


def grid_latency(results):
    """No target: what a token costs in each layout (2 ranks on one GPU talk over gloo)."""
    found = {layout: results.find("grid_decode", bench="grid_decode", layout=layout)
             for layout in ("one process", "2 stages (PP 2)", "TP 2")}
    if not all(found.values()):
        return results.missing("grid_decode")
    said = ", ".join(f"{layout} {record['ms_per_token_median']:.2f}"
                     for layout, record in found.items())
    return f"INFO  ms per token: {said} (backend {found['TP 2'].get('backend')})"


def family_runs(results):
    """The families have no speed target of their own: each part must finish on CUDA."""
    lines = []
    for part in ("family_llama3_decode", "family_mistral_decode"):
        record = results.find(part, bench="decode", impl="ours")
        if record is None or results.status(part) != "ok":
            lines.append((part, results.missing(part)))
            continue
        share = record.get("bandwidth_share") or 0.0
        lines.append((part, f"{verdict(True)}  finished: {record.get('shape')}, mode "
                            f"{record.get('mode')}, {record['decode_tokens_per_s']:.1f} tokens/s, "
                            f"{share:.0%} of the bandwidth limit"))
    record = results.find("family_qwen2_train", bench="train", impl="ours")
    if record is None or "error" in record or results.status("family_qwen2_train") != "ok":
        lines.append(("family_qwen2_train", results.missing("family_qwen2_train")))
    else:
        lines.append(("family_qwen2_train", f"{verdict(True)}  finished: {record.get('shape')}, "
                                            f"{record.get('tokens_per_s', 0):.0f} tokens/s"))
    return lines


def pipeline_target(results):
    ratio = results.find("pipeline_4stages", bench="train_ratio")
    if ratio is None:
        return results.missing("pipeline_4stages")
    return (f"{verdict(ratio['tokens_per_s_ratio'] >= 0.8)}  4 stages / 1 process tokens/s "
            f"{ratio['tokens_per_s_ratio']:.2f} (target >= 0.8); step time "
            f"{ratio.get('step_time_over_ideal', float('nan')):.2f}x the ideal on separate GPUs")


def gpu_tests(results, folder):
    log = Path(folder) / "gpu_tests.log"
    if not log.is_file():
        return results.missing("gpu_tests")
    last = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
    if last and "skipped" in last[0] and "passed" not in last[0] and "failed" not in last[0]:
        return f"MISSING  ({last[0]}: no CUDA GPU here)"
    ok = results.status("gpu_tests") == "ok" and last and "passed" in last[0]
    return f"{verdict(bool(ok))}  {last[0] if last else 'no output'}"


def summary_lines(folder) -> list:
    results = Results(read_results(folder))
    rows = [("train b8, no recompute", training_vs_peft(results, "train_b8")),
            ("train b32, recompute", training_vs_peft(results, "train_b32_recompute")),
            ("memory: 4 stages, 6 GiB cap", stage_peaks(results, "memory_4x6gib", 5.0)),
            ("memory: 2 stages, 10 GiB cap", stage_peaks(results, "memory_2x10gib", 9.0)),
            ("memory: int4, 2 x 4 GiB", stage_peaks(results, "int4_2x4gib")),
            ("memory: int8, 4 x 4 GiB", stage_peaks(results, "int8_4x4gib")),
            # a 4 GiB card less the planner's 0.5 GiB reserve
            ("memory: LoRA r8 int4, 2 x 4 GiB", stage_peaks(results, "lora_int4_2x4gib", 3.5)),
            *decode_targets(results),
            ("decode: 1 process / PP 2 / TP 2", grid_latency(results)),
            ("pipeline overhead", pipeline_target(results)),
            *family_runs(results),
            ("GPU tests", gpu_tests(results, folder))]
    device = next((r for r in results.records if r.get("device_name")), {})
    head = (f"GPU check, {device.get('date', '?')}, {device.get('device_name', '?')}, torch "
            f"{device.get('torch', '?')}")
    width = max(len(name) for name, _ in rows)
    return [head] + [f"{name:<{width}}  {line}" for name, line in rows]


def main(folder: str):
    """Print the GPU check's targets, met or not, from the results.jsonl in folder.

    folder: the folder bench/gpu_check.sh wrote (its OUT)
    """
    print("\n".join(summary_lines(folder)))


if __name__ == "__main__":
    run_cli(main)
