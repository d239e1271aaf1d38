#!/usr/bin/env python3
"""Write a random LoRA adapter for a GGUF base in llama.cpp's GGUF adapter format (with
gguf-py, the library llama.cpp's converter uses), for adapter speed benchmarks.

  make_lora.py BASE.gguf OUT.gguf [--rank 16] [--alpha 32] [--type F16|F32] [--seed 0]
               [--targets attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down]

Needs numpy and gguf (PyPI; the peer venv from ../shared/peer/setup.sh has both).
"""
import argparse
import numpy as np
import gguf

ALL = "attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("out")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--type", default="F16", choices=["F16", "F32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", default=ALL)
    a = ap.parse_args()

    reader = gguf.GGUFReader(a.base)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    targets = set(a.targets.split(","))
    rng = np.random.default_rng(a.seed)
    dtype = np.float16 if a.type == "F16" else np.float32

    w = gguf.GGUFWriter(a.out, arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", a.alpha)
    n = 0
    for t in reader.tensors:
        parts = t.name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in targets:
            continue
        cols, rows = int(t.shape[0]), int(t.shape[1])  # ggml ne = [in, out]
        # B small but nonzero so the adapter changes outputs like a trained one.
        lora_a = (rng.uniform(-1, 1, (a.rank, cols)) / np.sqrt(cols)).astype(dtype)
        lora_b = (rng.uniform(-1, 1, (rows, a.rank)) * 0.01).astype(dtype)
        w.add_tensor(t.name + ".lora_a", lora_a)
        w.add_tensor(t.name + ".lora_b", lora_b)
        n += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{a.out}: {n} LoRA pairs, rank {a.rank}, alpha {a.alpha}, {a.type}, arch {arch}")


if __name__ == "__main__":
    main()
