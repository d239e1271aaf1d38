"""Tests of graft.train: the same run as `graft train`, progress and cancellation,
every method's result loading back, and its errors. Uses the conformance suite's
tiny llama model, so a run takes a fraction of a second.
"""

import ast
import inspect
import json
import math
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import graft
from test_graft import graft_cli, graft_run, model_path

NAME = "llama-gqa-Q8_0"
STUBS = Path(graft.__file__).with_name("__init__.pyi")
# Small and fast; lr high enough that a few steps change the model visibly.
FAST = dict(steps=8, batch=4, lr=1e-2, warmup=2, eval_max=2)


@pytest.fixture(scope="module")
def model():
    return graft.Model(str(model_path(NAME)))


def reverse_records(n=40, seed=0):
    """A tiny task: reverse three words."""
    rng = random.Random(seed)
    words = "red green blue cat dog sun moon tree".split()
    out = []
    for _ in range(n):
        w = rng.sample(words, 3)
        out.append({"prompt": f"reverse: {' '.join(w)} =", "completion": " " + " ".join(w[::-1])})
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def probe_tokens(m):
    return m.tokenize("reverse: cat sun tree =")


def changes_logits(m, name):
    base = m.logits(probe_tokens(m))
    adapted = m.logits(probe_tokens(m), adapters=name)
    return not np.allclose(base, adapted)


def test_lora_from_records_loads_and_generates(model, tmp_path):
    records = reverse_records()
    out = tmp_path / "rev.gguf"
    events = []
    report = graft.train(model, records, out, progress=events.append, **FAST)

    kinds = [e.kind for e in events]
    assert kinds == ["started"] + ["step"] * FAST["steps"] + ["finishing"]
    started, steps, finishing = events[0], events[1:-1], events[-1]
    assert [e.step for e in steps] == list(range(1, FAST["steps"] + 1))
    assert all(e.steps == FAST["steps"] for e in events)
    assert started.step == 0 and started.method == "lora"
    assert started.trainable_params == report.trainable_params > 0
    assert started.train_examples + started.eval_examples == len(records)
    for e in steps:
        assert math.isfinite(e.loss) and e.lr > 0 and e.grad_norm > 0 and e.tokens > 0
        assert e.eval_loss is None and e.method is None
    assert finishing.step == FAST["steps"]
    # The learning rate warms up, and training lowers the loss.
    assert steps[0].lr < steps[FAST["warmup"] - 1].lr
    assert steps[-1].loss < steps[0].loss

    assert isinstance(report, graft.TrainReport)
    assert report.method == "lora" and report.steps == FAST["steps"]
    assert report.train_loss == steps[-1].loss
    assert math.isfinite(report.eval_loss)
    assert report.eval_records == min(FAST["eval_max"], started.eval_examples)
    assert 0.0 <= report.eval_exact_match <= 1.0
    assert report.retention_exact_match is None
    assert report.out == str(out) and report.out_bytes == out.stat().st_size
    assert "TrainReport(method=\"lora\"" in repr(report)

    m = graft.Model(str(model_path(NAME)))
    info = m.load_adapter("rev", out)
    assert info.format == "gguf-lora"
    assert changes_logits(m, "rev")
    prompt = records[0]["prompt"]
    text = m.generate(prompt, max_tokens=8, adapters="rev")
    assert text.encode() == graft_run(model_path(NAME), prompt, [(out, 1.0)], n=8)


def test_file_data_equals_graft_train(model, tmp_path):
    """The path form runs exactly what `graft train` runs: same defaults, same bytes,
    same report."""
    data = write_jsonl(tmp_path / "rev.jsonl", reverse_records())
    out_cli = tmp_path / "cli.gguf"
    r = graft_cli(
        "train", "-m", model_path(NAME), "--data", data, "-o", out_cli,
        "--steps", FAST["steps"], "--batch", FAST["batch"], "--lr", FAST["lr"],
        "--warmup", FAST["warmup"], "--eval-max", FAST["eval_max"],
    )
    cli = json.loads(r.stdout)
    for form in (data, str(data)):  # os.PathLike and str
        out = tmp_path / "py.gguf"
        report = graft.train(model, form, out, **FAST)
        assert out.read_bytes() == out_cli.read_bytes()
        for k in ["method", "steps", "trainable_params", "train_loss", "eval_loss",
                  "eval_exact_match", "eval_records", "out_bytes"]:
            assert getattr(report, k) == cli[k], k
    # Records given in Python are the same run as the file.
    out = tmp_path / "records.gguf"
    graft.train(model, reverse_records(), out, **FAST)
    assert out.read_bytes() == out_cli.read_bytes()


def test_text_data(model, tmp_path):
    text = " ".join(r["prompt"] + r["completion"] for r in reverse_records())
    out = tmp_path / "text.gguf"
    events = []
    report = graft.train(model, None, out, text=text, max_len=32, eval_every=4,
                         progress=events.append, **FAST)
    assert report.steps == FAST["steps"] and out.is_file()
    # Periodic evaluation before the last step (the final one is the report's).
    evals = [e for e in events if e.kind == "eval"]
    assert [e.step for e in evals] == [4]
    assert math.isfinite(evals[0].eval_loss) and evals[0].steps == FAST["steps"]
    assert evals[0].loss == next(e.loss for e in events if e.kind == "step" and e.step == 4)
    # Text has no records to complete: no exact match.
    assert report.eval_exact_match is None and report.eval_records == 0
    with pytest.raises(TypeError, match="not both"):
        graft.train(model, reverse_records(), out, text=text)
    with pytest.raises(TypeError, match="text="):
        graft.train(model, None, out)


@pytest.mark.parametrize(
    "method,suffix,fmt,opts",
    [
        ("sara", ".safetensors", "sara", dict(theta=0.05)),
        ("rps", ".rps", "rps", dict(rho=0.05)),
        ("rps", ".rps", "rps", dict(rps_mode="delta", scaler="v5", budget=4096)),
        ("lora", "", "peft", dict(format="peft", rank=4, targets="q,v")),
    ],
)
def test_other_methods_load(tmp_path, method, suffix, fmt, opts):
    m = graft.Model(str(model_path(NAME)))
    out = tmp_path / f"a{suffix}"
    report = graft.train(m, reverse_records(), out, method=method, **FAST, **opts)
    assert report.method == method and report.steps == FAST["steps"]
    assert report.out_bytes > 0 and out.exists()
    info = m.load_adapter("a", out)
    assert info.format == fmt
    assert changes_logits(m, "a")
    assert isinstance(m.generate("reverse: cat sun tree =", max_tokens=4, adapters="a"), str)


def test_callback_true_cancels(model, tmp_path):
    out = tmp_path / "c.gguf"
    seen = []

    def stop_at_3(p):
        seen.append((p.kind, p.step))
        return p.kind == "step" and p.step == 3

    with pytest.raises(graft.TrainCancelled) as e:
        graft.train(model, reverse_records(), out, progress=stop_at_3, **FAST)
    assert e.value.step == 3
    assert isinstance(e.value, graft.GraftError)
    assert "cancelled after step 3" in str(e.value)
    assert not out.exists()
    # Not called again once it asked to stop.
    assert seen == [("started", 0), ("step", 1), ("step", 2), ("step", 3)]

    with pytest.raises(graft.TrainCancelled) as e:
        graft.train(model, reverse_records(), out, progress=lambda p: True, **FAST)
    assert e.value.step == 0 and not out.exists()


def test_cancel_then_resume_equals_one_run(model, tmp_path):
    whole = tmp_path / "whole.gguf"
    graft.train(model, reverse_records(), whole, **FAST)
    out, ck = tmp_path / "resumed.gguf", tmp_path / "ck.bin"
    with pytest.raises(graft.TrainCancelled):
        graft.train(model, reverse_records(), out, checkpoint=ck, checkpoint_every=2,
                    progress=lambda p: p.step == 5, **FAST)
    assert ck.is_file() and not out.exists()
    events = []
    graft.train(model, reverse_records(), out, resume=ck, progress=events.append, **FAST)
    assert events[0].kind == "started" and events[0].step == 5
    assert [e.step for e in events if e.kind == "step"] == list(range(6, FAST["steps"] + 1))
    assert out.read_bytes() == whole.read_bytes()


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_callback_exception_stops_and_propagates(model, tmp_path, exc):
    out = tmp_path / "x.gguf"
    calls = []

    def fail_at_2(p):
        calls.append(p.step)
        if p.kind == "step" and p.step == 2:
            raise exc

    with pytest.raises(type(exc)):
        graft.train(model, reverse_records(), out, progress=fail_at_2, **FAST)
    assert calls == [0, 1, 2]
    assert not out.exists()


def test_ctrl_c_stops_training(tmp_path):
    """SIGINT while the GIL is released stops training at the next step."""
    script = textwrap.dedent(f"""
        import sys, graft
        m = graft.Model({str(model_path(NAME))!r})
        recs = [{{"prompt": "a b =", "completion": " b a"}}] * 8
        def started(p):
            if p.kind == "started":
                print("started", flush=True)
        try:
            graft.train(m, recs, {str(tmp_path / "int.gguf")!r}, steps=10**9, batch=2,
                        progress=started)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(0)
        sys.exit(3)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "started"
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0 and out.strip() == "interrupted"
    assert not (tmp_path / "int.gguf").exists()


def test_value_errors_name_the_allowed_values(model, tmp_path):
    out = tmp_path / "e.gguf"
    recs = reverse_records()
    cases = [
        (dict(method="dora"), ["lora", "full", "sara", "rps"]),
        (dict(format="onnx"), ["gguf", "peft", "sara", "rps"]),
        (dict(rps_mode="pool"), ["lora", "delta"]),
        (dict(scaler="v9"), ["v1", "v5", "none"]),
    ]
    for kw, allowed in cases:
        with pytest.raises(ValueError) as e:
            graft.train(model, recs, out, **kw)
        (key, value), = kw.items()
        assert f'{key}="{value}"' in str(e.value)
        for a in allowed:
            assert f'"{a}"' in str(e.value)
    with pytest.raises(ValueError, match="empty"):
        graft.train(model, [], out)
    with pytest.raises(ValueError, match=r"data\[1\]: \"completion\" is missing"):
        graft.train(model, [recs[0], {"prompt": "x"}], out)
    with pytest.raises(TypeError, match=r"data\[0\]\[\"completion\"\]: expected a str"):
        graft.train(model, [{"prompt": "x", "completion": 3}], out)
    with pytest.raises(TypeError, match=r"data\[0\]: expected a dict"):
        graft.train(model, [("x", "y")], out)
    with pytest.raises(TypeError, match="progress must be callable"):
        graft.train(model, recs, out, progress=3)
    assert not out.exists()


def test_graft_errors_carry_graft_message(model, tmp_path):
    out = tmp_path / "e.gguf"
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(graft.GraftError, match="missing.jsonl") as e:
        graft.train(model, missing, out)
    assert not isinstance(e.value, graft.TrainCancelled)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    with pytest.raises(graft.GraftError, match="bad.jsonl:2: not JSON"):
        graft.train(model, bad, out)
    with pytest.raises(graft.GraftError, match="cannot be written as format"):
        graft.train(model, reverse_records(), out, method="sara", format="gguf")
    with pytest.raises(graft.GraftError, match="unknown target \"nope\""):
        graft.train(model, reverse_records(), out, targets="q,nope")
    assert not out.exists()


def test_defaults_are_graft_trains_and_stubs_agree():
    defaults = graft.train_defaults()
    # Every keyword of train() has a default reported by train_defaults().
    params = inspect.signature(graft.train).parameters
    kw = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert kw == list(defaults)
    # The stubs show the same defaults.
    tree = ast.parse(STUBS.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    stub = {a.arg: ast.literal_eval(d) for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults)}
    assert stub == defaults
    # And they are graft train's (spot checks against its --help).
    help_text = graft_cli("train", "--help").stdout.decode()
    for flag, key in [("--rank", "rank"), ("--steps", "steps"), ("--batch", "batch"),
                      ("--max-len", "max_len"), ("--rps-seed", "rps_seed")]:
        section = help_text.split(flag, 1)[1].split("\n  -", 1)[0]
        assert f"[default: {defaults[key]}]" in section, flag
