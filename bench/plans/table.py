"""Markdown table of bench/plans/*.jsonl rows (from bench/plans/run_rows.sh), one or several files:

  python bench/plans/table.py bench/plans/before.jsonl bench/plans/after.jsonl

With several files the first column names the file (before / after / defaults)."""
import json
import os
import sys


def g(n):
    return "" if n is None else f"{n / 2**30:.1f}"


def shape(r):
    if r["job"] == "sft":
        return f"L={r['seq_len']}, batch {r['batch']}" + (f", accum {r['accum_steps']}" if r.get("accum_steps", 1) > 1 else "")
    if r["job"] == "rl":
        lay = f"{r.get('vectorize')}/{r.get('grad_mode')}"
        updates = (f", {r['mini_batches']} mini-batches" if r.get("mini_batches", 1) > 1 else "") + \
            (f", accum {r['accum_steps']}" if r.get("accum_steps", 1) > 1 else "")
        return f"L={r['seq_len']}, {r['rollouts']} rollouts{updates}, N={r.get('num_timesteps')}, {lay}"
    return f"batch {r['batch']}, prompt {r['prompt_length']}, gen {r['gen_length']}"


def mesh(r):
    return " x ".join(f"{k}={v}" for k, v in r.get("mesh", {}).items() if v > 1) or "1 chip"


def fits(r):
    if "required_bytes" in r:
        return f"no: XLA refuses (temporaries alone {r['required_bytes'] / r['hbm_bytes']:.2f}x HBM)"
    return f"{'yes' if r['fits'] else 'no'} ({r['total_bytes'] / r['hbm_bytes']:.0%} of HBM)"


def main(paths):
    many = len(paths) > 1
    head = (["plan"] if many else []) + ["job", "model", "topology", "mesh", "shape", "remat", "attention", "moe",
                                         "arguments", "temporaries", "total", "HBM", "fits", "command"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for path in paths:
        label = [os.path.splitext(os.path.basename(path))[0]] if many else []
        for line in open(path):
            r = json.loads(line)
            cmd = f"`python launch/compile.py {r['args']}`"
            if "job" not in r:
                why = "timed out" if r.get("rc") == 124 else f"exit {r.get('rc')}"
                print("| " + " | ".join(label + [f"{why} (no report)"] + [""] * (len(head) - len(label) - 2) + [cmd]) + " |")
                continue
            dt = r.get("param_dtype") if r["job"] == "decode" else ""
            if r.get("lora_rank"):  # LoRA SFT: the adapters' rank and the frozen base's dtype
                dt = f"LoRA r{r['lora_rank']}, {r.get('base_dtype', r.get('param_dtype'))} base"
            cells = label + [r["job"], f"{r['model']}{' ' + dt if dt else ''}", f"{r['cloud_name']} ({r['chips']} chips)",
                             mesh(r), shape(r), r["remat"], r.get("attention", "xla"), r.get("moe_impl", ""),
                             g(r.get("argument_bytes")), g(r.get("temporary_bytes", r.get("required_bytes"))),
                             g(r.get("total_bytes")), g(r["hbm_bytes"]), fits(r), cmd]
            print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
