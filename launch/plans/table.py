"""Markdown table of launch/plans/*.jsonl rows (from launch/plans/run_rows.sh): python launch/plans/table.py launch/plans/before.jsonl"""
import json
import sys


def g(n):
    return "" if n is None else f"{n / 2**30:.1f}"


def shape(r):
    if r["job"] == "sft":
        return f"L={r['seq_len']}, batch {r['batch']}"
    if r["job"] == "rl":
        lay = f"{r.get('vectorize')}/{r.get('grad_mode')}"
        return f"L={r['seq_len']}, {r['rollouts']} rollouts, N={r.get('num_timesteps')}, {lay}"
    return f"batch {r['batch']}, prompt {r['prompt_length']}, gen {r['gen_length']}"


print("| job | model | topology | shape | remat | attention | arguments | temporaries | total | HBM | fits | command |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "job" not in r:
        why = "timed out" if r.get("rc") == 124 else f"exit {r.get('rc')}"
        print(f"| {why} (no report) | | | | | | | | | | | `python launch/compile.py {r['args']}` |")
        continue
    if "required_bytes" in r:
        fits = f"no: XLA refuses ({r['required_bytes'] / r['hbm_bytes']:.1f}x HBM)"
    else:
        fits = "yes" if r["fits"] else f"no ({r['total_bytes'] / r['hbm_bytes']:.0%} of HBM)"
    dt = r.get("param_dtype") if r["job"] == "decode" else ""
    print(f"| {r['job']} | {r['model']}{' ' + dt if dt else ''} | {r['cloud_name']} ({r['chips']} chips) | {shape(r)} | "
          f"{r['remat']} | {r.get('attention', 'xla')} | {g(r.get('argument_bytes'))} | "
          f"{g(r.get('temporary_bytes', r.get('required_bytes')))} | {g(r.get('total_bytes'))} | {g(r['hbm_bytes'])} | {fits} | "
          f"`python launch/compile.py {r['args']}` |")
