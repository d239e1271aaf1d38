#!/usr/bin/env python3
"""Adapter speed on one base, as alternating pairs (this VM drifts +-20% within a minute):
decode without/with one LoRA, and a batch of 8 sequences on one adapter vs 8 adapters.

  scripts/bench-adapters.py BASE.gguf LORA0.gguf [LORA1.gguf ... LORA7.gguf] [--pairs 9]

Make the adapters with scripts/make_lora.py (rank 16, all projections). Prints median tok/s
and the median (and range) of the per-pair ratios.
"""
import argparse, json, statistics, subprocess

ap = argparse.ArgumentParser()
ap.add_argument("base")
ap.add_argument("loras", nargs="+")
ap.add_argument("--pairs", type=int, default=9)
ap.add_argument("--graft", default="./target/release/graft")
a = ap.parse_args()
one = ["--adapter", a.loras[0]]
eight = sum((["--adapter", a.loras[i % len(a.loras)]] for i in range(8)), [])


def tg(extra):
    cmd = [a.graft, "bench", "-m", a.base, "--pp", "0", "--tg", "64", "-r", "1", "-t", "2"]
    out = subprocess.run(cmd + extra, capture_output=True, text=True, check=True).stdout
    return json.loads(out)["tg_tokens_per_s"]


rows = {"base": [], "lora": [], "batch8_one": [], "batch8_eight": []}
for _ in range(a.pairs):
    vals = (tg([]), tg(one), tg(["--batch", "8"] + one),
            tg(["--batch", "8", "--per-sequence"] + eight))
    for k, v in zip(rows, vals):
        rows[k].append(v)
print(a.base, {k: round(statistics.median(v), 1) for k, v in rows.items()})
for name, num, den in (("lora/base", "lora", "base"), ("eight/one", "batch8_eight", "batch8_one")):
    r = [x / y for x, y in zip(rows[num], rows[den])]
    print(f"  {name}: median {statistics.median(r):.2f}, range {min(r):.2f}-{max(r):.2f}")
