"""Tests of the graft Python bindings against the `graft` binary and the conformance
suite (`<repo>/../shared/conformance`). They fail, never skip, when either is missing.
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import graft

REPO = Path(__file__).resolve().parents[3]
CONF = Path(os.environ.get("GRAFT_CONFORMANCE", REPO.parent / "shared" / "conformance"))
GRAFT_BIN = Path(os.environ.get("GRAFT_BIN", REPO / "target" / "release" / "graft"))

MODELS = ["llama-gqa-Q8_0", "llama-gqa-F32", "qwen2-Q4_0", "llama-tied-Q4_K_M"]
N = 24


def conf(rel):
    if not CONF.is_dir():
        pytest.fail(f"conformance suite not found at {CONF} (set GRAFT_CONFORMANCE)")
    p = CONF / rel
    if not p.exists():
        pytest.fail(f"{p}: missing from the conformance suite")
    return p


def model_path(name):
    return conf(f"models/{name}.gguf")


def family(name):
    return name.rsplit("-", 1)[0]


def lora(name, kind):
    return conf(f"models/{family(name)}-lora-{kind}.gguf")


def prompts():
    case = json.loads(conf("cases/llama-gqa-Q8_0/case.json").read_text())
    return [g["prompt"] for g in case["greedy"]] + ["Hello world"]


def graft_cli(*args, check=True):
    if not GRAFT_BIN.is_file():
        pytest.fail(
            f"{GRAFT_BIN}: graft binary not found; build it with "
            "`cargo build --release -p graft-cli` in the repository (or set GRAFT_BIN)"
        )
    r = subprocess.run([str(GRAFT_BIN), *map(str, args)], capture_output=True)
    if check and r.returncode != 0:
        pytest.fail(f"graft {' '.join(map(str, args))} failed: {r.stderr.decode()}")
    return r


def graft_run(model, prompt, adapters=(), n=N):
    """stdout of `graft run --temp 0`, without the newline it prints at the end."""
    args = ["run", "-m", model, "-p", prompt, "--temp", "0", "-n", n]
    for path, scale in adapters:
        args += ["--adapter", f"{path}:{scale}"]
    out = graft_cli(*args).stdout
    assert out.endswith(b"\n")
    return out[:-1]


def cli_error(*args):
    """graft's error message for a failing command (after its `error: ` prefix)."""
    r = graft_cli(*args, check=False)
    assert r.returncode != 0
    err = r.stderr.decode().strip().splitlines()[-1]
    assert err.startswith("error: "), err
    return err[len("error: "):]


_models = {}


def load(name):
    if name not in _models:
        _models[name] = graft.Model(str(model_path(name)))
    return _models[name]


def fresh(name):
    """A model of its own, so adapter names do not leak between tests."""
    return graft.Model(str(model_path(name)))


# --- generation equals `graft run` -------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generate_equals_graft_run(name):
    m = load(name)
    for prompt in prompts():
        text = m.generate(prompt, max_tokens=N)
        assert text.encode() == graft_run(model_path(name), prompt)


@pytest.mark.parametrize("name", ["llama-gqa-Q8_0", "qwen2-Q4_0", "llama-gqa-F32"])
def test_greedy_generate_with_adapters_equals_graft_run(name):
    m = fresh(name)
    a, b = lora(name, "all-r8"), lora(name, "qv-r4")
    m.load_adapter("a", str(a))
    m.load_adapter("b", str(b))
    for prompt in prompts():
        base = m.generate(prompt, max_tokens=N)
        one = m.generate(prompt, max_tokens=N, adapters="a")
        assert one.encode() == graft_run(model_path(name), prompt, [(a, 1.0)])
        half = m.generate(prompt, max_tokens=N, adapters=[("a", 0.5)])
        assert half.encode() == graft_run(model_path(name), prompt, [(a, 0.5)])
        stacked = m.generate(prompt, max_tokens=N, adapters=[("a", 0.5), ("b", 1.0)])
        assert stacked.encode() == graft_run(model_path(name), prompt, [(a, 0.5), (b, 1.0)])
        # The adapters must change something, or the comparisons above prove little.
        assert len({base, one, half, stacked}) > 1


def test_generate_token_prompt_and_tokenize_match_llama_cpp():
    m = load("llama-gqa-Q8_0")
    case = json.loads(conf("cases/llama-gqa-Q8_0/case.json").read_text())
    for g in case["greedy"]:
        ids = m.tokenize(g["prompt"])
        assert ids == g["prompt_ids"]
        assert m.generate(ids, max_tokens=N) == m.generate(g["prompt"], max_tokens=N)
        # Greedy tokens follow llama.cpp's up to the first step it decided by a small
        # margin (Q8_0 tolerance of the suite: 1.0).
        s = m.stream(ids, max_tokens=len(g["continuation"]), ignore_eos=True)
        "".join(s)
        for got, want, margin in zip(s.tokens, g["continuation"], g["margins"]):
            if margin < 1.0:
                break
            assert got == want


def test_sampling_is_seeded():
    m = load("llama-gqa-Q8_0")
    p = "Once upon a time"
    a = m.generate(p, max_tokens=N, temperature=0.9, seed=7)
    assert a == m.generate(p, max_tokens=N, temperature=0.9, seed=7)
    r = graft_cli(
        "run", "-m", model_path("llama-gqa-Q8_0"), "-p", p, "-n", N, "--temp", "0.9", "-s", 7
    )
    assert a.encode() + b"\n" == r.stdout


# --- streaming -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama-gqa-Q8_0", "qwen2-Q4_0"])
def test_stream_concatenates_to_generate(name):
    m = load(name)
    for prompt in prompts():
        text = m.generate(prompt, max_tokens=N)
        s = m.stream(prompt, max_tokens=N)
        assert s.finish_reason is None
        pieces = list(s)
        assert len(pieces) > 1
        assert "".join(pieces) == text
        assert s.finish_reason in ("length", "stop")
        assert len(s.tokens) <= N
        assert m.detokenize(s.tokens) == text
        # Iterating again after the end stays ended.
        assert list(s) == []


def test_stream_stop_strings_and_close():
    m = load("llama-gqa-Q8_0")
    prompt = prompts()[0]
    full = m.generate(prompt, max_tokens=N)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop
    cut = m.generate(prompt, max_tokens=N, stop=[stop])
    assert cut == full[: full.index(stop)]
    s = m.stream(prompt, max_tokens=N, stop=[stop])
    assert "".join(s) == cut
    assert s.finish_reason == "stop"

    s = m.stream(prompt, max_tokens=N)
    first = next(s)
    assert full.startswith(first)
    s.close()
    with pytest.raises(StopIteration):
        next(s)


# --- adapters: hot swap ---------------------------------------------------------------


def test_adapter_hot_swap():
    name = "llama-gqa-Q8_0"
    m = fresh(name)
    a, b = lora(name, "all-r8"), lora(name, "qv-r4")
    prompt = prompts()[0]
    info = m.load_adapter("x", str(a))
    assert (info.name, info.format, info.path) == ("x", "gguf-lora", str(a))
    assert [i.name for i in m.adapters()] == ["x"]
    text_a = m.generate(prompt, max_tokens=N, adapters="x")
    logits_a = m.logits(m.tokenize(prompt), adapters="x")
    session = graft.Session(m, adapters="x")
    stream = m.stream(prompt, max_tokens=N, adapters="x")

    info_b = m.replace_adapter("x", str(b))
    assert info_b.generation > info.generation and info_b.path == str(b)
    text_b = m.generate(prompt, max_tokens=N, adapters="x")
    assert text_b != text_a
    assert text_b.encode() == graft_run(model_path(name), prompt, [(b, 1.0)])
    assert not np.array_equal(m.logits(m.tokenize(prompt), adapters="x"), logits_a)

    # What started before the swap keeps the version it started with.
    assert "".join(stream) == text_a
    last = session.append(m.tokenize(prompt))
    np.testing.assert_array_equal(last, logits_a[-1])

    m.unload_adapter("x")
    assert m.adapters() == []
    with pytest.raises(graft.GraftError, match='no adapter named "x" is loaded'):
        m.generate(prompt, max_tokens=N, adapters="x")
    with pytest.raises(graft.GraftError, match='no adapter named "x" is loaded'):
        m.unload_adapter("x")
    with pytest.raises(graft.GraftError, match='no adapter named "x" is loaded'):
        m.replace_adapter("x", str(a))
    # The session still holds its version after the name is gone.
    assert session.append([13]).shape == (m.n_vocab,)
    # Loading the name again works and gives a newer generation.
    assert m.load_adapter("x", str(a)).generation > info_b.generation
    assert m.generate(prompt, max_tokens=N, adapters="x") == text_a


# --- logits ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama-gqa-Q8_0", "qwen2-F32"])
def test_logits_equal_graft_logits(name, tmp_path):
    m = fresh(name)
    tokens = m.tokenize(prompts()[0])
    a = lora(name, "all-r8")
    m.load_adapter("a", str(a))
    for adapters, extra in [(None, []), ([("a", 0.5)], ["--adapter", f"{a}:0.5"])]:
        out = tmp_path / "logits.safetensors"
        graft_cli(
            "logits", "-m", model_path(name), "--tokens", ",".join(map(str, tokens)),
            "-o", out, *extra,
        )
        want = load_file(str(out))
        got = m.logits(tokens, adapters=adapters)
        assert isinstance(got, np.ndarray)
        assert got.dtype == np.float32 and got.shape == (len(tokens), m.n_vocab)
        assert want["tokens"].tolist() == tokens
        np.testing.assert_array_equal(got, want["logits"])


def test_logits_close_to_llama_cpp():
    for case_name, adapters in [("llama-gqa-F32", None), ("llama-gqa-F32+all-r8@0.5", "all-r8@0.5")]:
        case = json.loads(conf(f"cases/{case_name}/case.json").read_text())
        m = fresh("llama-gqa-F32")
        spec = None
        if adapters:
            ad = case["adapters"][0]
            m.load_adapter("a", str(conf(ad["gguf"])))
            spec = [("a", ad["scale"])]
        exp = load_file(str(conf(f"cases/{case_name}/expected.safetensors")))
        for i in range(len(case["greedy"])):
            tokens = exp[f"seq{i}.tokens"].tolist()
            ref = exp[f"seq{i}.logits"]
            got = m.logits(tokens, adapters=spec)
            err = np.abs(got - ref).max() / np.abs(ref).max()
            assert err <= 2e-3, (case_name, i, err)


# --- sessions ----------------------------------------------------------------------------


def test_session_incremental_decode_matches_generate():
    m = load("llama-gqa-Q8_0")
    prompt = prompts()[1]
    ids = m.tokenize(prompt)
    s = m.stream(ids, max_tokens=N, ignore_eos=True)
    "".join(s)
    sess = graft.Session(m)
    assert len(sess) == 0 and sess.n_ctx >= 64
    logits = sess.append(ids)
    assert logits.shape == (m.n_vocab,) and logits.dtype == np.float32
    got = []
    for _ in range(N):
        t = int(np.argmax(logits))
        got.append(t)
        logits = sess.append([t])
    assert got == s.tokens
    assert sess.tokens == ids + got

    full = m.logits(sess.tokens)
    np.testing.assert_allclose(logits, full[-1], rtol=1e-4, atol=1e-4)
    sess.truncate(len(ids))
    assert sess.tokens == ids
    np.testing.assert_allclose(sess.append([got[0]]), full[len(ids)], rtol=1e-4, atol=1e-4)
    sess.reset()
    assert len(sess) == 0
    all_logits = sess.append(ids, all_logits=True)
    assert all_logits.shape == (len(ids), m.n_vocab)
    np.testing.assert_allclose(all_logits, full[: len(ids)], rtol=1e-4, atol=1e-4)


def test_session_full_cache_is_an_error_and_changes_nothing():
    m = load("llama-gqa-Q8_0")
    sess = graft.Session(m, n_ctx=32)
    first = sess.append([1, 2, 3])
    with pytest.raises(graft.GraftError, match="KV cache full"):
        sess.append(list(range(4, 44)))
    assert sess.tokens == [1, 2, 3]
    again = graft.Session(m, n_ctx=32)
    again.append([1, 2, 3])
    np.testing.assert_array_equal(sess.append([4]), again.append([4]))
    assert first.shape == (m.n_vocab,)


# --- errors ---------------------------------------------------------------------------------


def test_errors_carry_graft_message():
    missing = CONF / "models" / "no-such-model.gguf"
    conf("models")
    want = cli_error("run", "-m", missing, "-p", "hi")
    with pytest.raises(graft.GraftError) as e:
        graft.Model(str(missing))
    assert str(e.value) == want
    assert "no-such-model.gguf" in want

    base, wrong = model_path("llama-gqa-Q8_0"), conf("models/qwen2-lora-all-r8.gguf")
    want = cli_error("run", "-m", base, "--adapter", wrong, "-p", "hi")
    m = fresh("llama-gqa-Q8_0")
    with pytest.raises(graft.GraftError) as e:
        m.load_adapter("q", str(wrong))
    assert str(e.value) == want
    assert "qwen2" in want and "llama" in want
    assert m.adapters() == []

    with pytest.raises(graft.GraftError, match='no adapter named "nope" is loaded'):
        m.logits([1, 2], adapters=["nope"])
    with pytest.raises(graft.GraftError, match='no adapter named "nope" is loaded'):
        graft.Session(m, adapters="nope")
    with pytest.raises(graft.GraftError, match='no adapter named "nope" is loaded'):
        m.stream("hi", adapters=[("nope", 0.5)])
    assert issubclass(graft.GraftError, Exception)


def test_argument_errors_are_python_errors():
    m = load("llama-gqa-Q8_0")
    with pytest.raises(TypeError):
        m.logits("not tokens")
    with pytest.raises(TypeError):
        m.generate("hi", adapters=5)
    with pytest.raises(TypeError):
        m.generate(3.5)
    with pytest.raises(ValueError, match="out of range"):
        m.logits([1, m.n_vocab])
    with pytest.raises(ValueError):
        m.logits([])
    with pytest.raises(ValueError):
        m.generate("hi", kv_type="f8")
    with pytest.raises(OverflowError):
        m.logits([-1])
    with pytest.raises(ValueError, match="threads must be at least 1"):
        graft.Model(str(model_path("llama-gqa-Q8_0")), threads=0)
    with pytest.raises(TypeError):
        m.load_adapter("a", 5)
