"""Logits of a graft-exported ONNX model with Python's onnxruntime (used by ort.rs).

usage: ort_logits.py MODEL_DIR TOKENS(comma-separated) OUT.f32 [ADAPTER.onnx_adapter]

Writes logits [n, vocab] as little-endian float32. The prompt runs in two parts (all
but the last token, then the last one with the first part's KV cache), which exercises
the past/present interface; logits of both parts are written, in order.
"""
import sys

import numpy as np
import onnxruntime as ort


def main():
    model_dir, tokens, out = sys.argv[1:4]
    adapter = sys.argv[4] if len(sys.argv) > 4 else None
    ids = np.array([[int(t) for t in tokens.split(",")]], dtype=np.int64)
    sess = ort.InferenceSession(f"{model_dir}/model.onnx", providers=["CPUExecutionProvider"])
    run_options = None
    if adapter:
        lora = ort.LoraAdapter()
        lora.Load(adapter)
        run_options = ort.RunOptions()
        run_options.add_active_adapter(lora)
    names = [o.name for o in sess.get_outputs()]
    # Prefill: the past_* and num_logits inputs have defaults (empty cache, all logits).
    first = dict(zip(names, sess.run(None, {"input_ids": ids[:, :-1]}, run_options)))
    feeds = {"input_ids": ids[:, -1:], "num_logits": np.array([0], dtype=np.int64)}
    for name in names:
        if name.startswith("present_"):
            feeds[name.replace("present_", "past_", 1)] = first[name]
    second = dict(zip(names, sess.run(None, feeds, run_options)))
    logits = np.concatenate([first["logits"][0], second["logits"][0]], axis=0)
    assert logits.shape[0] == ids.shape[1], logits.shape
    logits.astype("<f4").tofile(out)


if __name__ == "__main__":
    main()
