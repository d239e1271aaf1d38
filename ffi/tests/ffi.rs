//! The C ABI's core paths called directly through the rlib (the C program and the
//! valgrind run are in ffi/check.sh).

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::PathBuf;
use std::ptr;

use graft::*;
use graft_status::*;

fn models() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance/models");
    assert!(
        dir.join("llama-gqa-Q8_0.gguf").is_file(),
        "conformance suite missing: expected {} (clone graft next to shared/)",
        dir.display()
    );
    dir
}

fn cpath(name: &str) -> CString {
    CString::new(models().join(name).to_str().unwrap()).unwrap()
}

fn last_error() -> String {
    // SAFETY: graft_last_error never returns NULL and the string stays valid until
    // the next graft call on this thread; it is copied at once.
    unsafe { CStr::from_ptr(graft_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn load() -> *mut graft_model {
    let mut m = ptr::null_mut();
    let path = cpath("llama-gqa-Q8_0.gguf");
    // SAFETY: valid NUL-terminated path, NULL options (defaults), valid out pointer.
    let st = unsafe { graft_model_load(path.as_ptr(), ptr::null(), &mut m) };
    assert_eq!(st, GRAFT_OK, "{}", last_error());
    m
}

fn tokenize(m: *const graft_model, text: &str) -> Vec<u32> {
    let mut toks = vec![0u32; 64];
    let mut n = 0;
    // SAFETY: live model, text bytes with their length, buffer of 64 and a count.
    let st = unsafe {
        graft_tokenize(
            m,
            text.as_ptr().cast(),
            text.len(),
            true,
            false,
            toks.as_mut_ptr(),
            toks.len(),
            &mut n,
        )
    };
    assert_eq!(st, GRAFT_OK, "{}", last_error());
    toks.truncate(n);
    toks
}

fn greedy(s: *const graft_session, prompt: &[u32], max: usize) -> Vec<u32> {
    let mut p = graft_generate_params_default();
    p.max_tokens = max;
    p.ignore_eos = true;
    let mut out = vec![0u32; max];
    let mut r = graft_generate_result {
        n_tokens: 0,
        finish: graft_finish_reason::GRAFT_FINISH_STOP,
    };
    // SAFETY: live session, prompt slice, params, no callback, output buffer of `max`.
    let st = unsafe {
        graft_generate(
            s,
            prompt.as_ptr(),
            prompt.len(),
            &p,
            None,
            ptr::null_mut(),
            out.as_mut_ptr(),
            max,
            &mut r,
        )
    };
    assert_eq!(st, GRAFT_OK, "{}", last_error());
    assert_eq!(r.n_tokens, max);
    out
}

#[test]
fn load_errors_set_status_and_message() {
    let mut m = ptr::null_mut();
    let missing = cpath("no-such-model.gguf");
    // SAFETY: valid arguments; the file does not exist.
    let st = unsafe { graft_model_load(missing.as_ptr(), ptr::null(), &mut m) };
    assert_eq!(st, GRAFT_ERR_IO);
    assert!(m.is_null());
    assert!(
        last_error().contains("no-such-model.gguf"),
        "{}",
        last_error()
    );
    // SAFETY: NULL path is checked and refused.
    let st = unsafe { graft_model_load(ptr::null(), ptr::null(), &mut m) };
    assert_eq!(st, GRAFT_ERR_INVALID_ARGUMENT);
    assert!(!last_error().is_empty());
    let mut opts = graft_model_options_default();
    let onnx = CString::new("onnxruntime").unwrap();
    opts.provider = onnx.as_ptr();
    let path = cpath("llama-gqa-Q8_0.gguf");
    // SAFETY: valid arguments; the provider is refused.
    let st = unsafe { graft_model_load(path.as_ptr(), &opts, &mut m) };
    assert_eq!(st, GRAFT_ERR_UNSUPPORTED);
    assert!(last_error().contains("onnxruntime"));
}

#[test]
fn tokens_round_trip_and_size_query() {
    let m = load();
    let text = "Hello world";
    let toks = tokenize(m, text);
    let mut len = 0;
    // SAFETY: size query: NULL buffer, capacity 0, valid length pointer.
    let st = unsafe {
        graft_detokenize(
            m,
            toks.as_ptr(),
            toks.len(),
            false,
            ptr::null_mut(),
            0,
            &mut len,
        )
    };
    assert_eq!(st, GRAFT_OK);
    let mut buf = vec![0 as c_char; len + 1];
    // SAFETY: buffer of len + 1 bytes.
    let st = unsafe {
        graft_detokenize(
            m,
            toks.as_ptr(),
            toks.len(),
            false,
            buf.as_mut_ptr(),
            buf.len(),
            &mut len,
        )
    };
    assert_eq!(st, GRAFT_OK, "{}", last_error());
    // SAFETY: graft wrote a NUL-terminated string into `buf`.
    let out = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap();
    assert_eq!(out.trim_start(), text);
    // SAFETY: handle from load(), freed once.
    unsafe { graft_model_free(m) };
}

extern "C" fn stop_at_two(_t: u32, _p: *const c_char, _l: usize, user: *mut c_void) -> bool {
    // SAFETY: the test passes a pointer to a live usize as user data.
    let calls = unsafe { &mut *user.cast::<usize>() };
    *calls += 1;
    *calls < 2
}

#[test]
fn generation_adapters_and_cancel() {
    let m = load();
    let prompt = tokenize(m, "The quick brown fox");
    let mut s = ptr::null_mut();
    // SAFETY: live model, default options, valid out pointer.
    assert_eq!(
        unsafe { graft_session_create(m, ptr::null(), &mut s) },
        GRAFT_OK
    );
    let base = greedy(s, &prompt, 12);
    assert_eq!(base, greedy(s, &prompt, 12), "greedy is deterministic");

    let (name, lora) = (
        CString::new("a").unwrap(),
        cpath("llama-gqa-lora-all-r8.gguf"),
    );
    let mut generation = 0u64;
    // SAFETY: live model, NUL-terminated strings, valid generation pointer.
    let st = unsafe { graft_adapter_load(m, name.as_ptr(), lora.as_ptr(), &mut generation) };
    assert_eq!(st, GRAFT_OK, "{}", last_error());
    let qwen = cpath("qwen2-lora-all-r8.gguf");
    // SAFETY: as above; the adapter is for another architecture.
    let st = unsafe { graft_adapter_load(m, name.as_ptr(), qwen.as_ptr(), ptr::null_mut()) };
    assert_eq!(st, GRAFT_ERR_INCOMPATIBLE, "{}", last_error());

    for (scale, changes) in [(1.0f32, true), (0.0, false)] {
        let r = graft_adapter_ref {
            name: name.as_ptr(),
            scale,
        };
        // SAFETY: live session, one valid adapter ref.
        assert_eq!(unsafe { graft_session_set_adapters(s, &r, 1) }, GRAFT_OK);
        assert_eq!(greedy(s, &prompt, 12) != base, changes, "scale {scale}");
    }

    let mut calls = 0usize;
    let mut r = graft_generate_result {
        n_tokens: 0,
        finish: graft_finish_reason::GRAFT_FINISH_STOP,
    };
    // SAFETY: live session, prompt, NULL params (defaults), a callback whose user data
    // is `calls`, no output buffer.
    let st = unsafe {
        graft_generate(
            s,
            prompt.as_ptr(),
            prompt.len(),
            ptr::null(),
            Some(stop_at_two),
            (&mut calls as *mut usize).cast(),
            ptr::null_mut(),
            0,
            &mut r,
        )
    };
    assert_eq!(st, GRAFT_ERR_CANCELLED);
    assert_eq!(
        (r.n_tokens, r.finish, calls),
        (2, graft_finish_reason::GRAFT_FINISH_CANCELLED, 2)
    );
    // SAFETY: handles created above, each freed once (session first or last: both fine).
    unsafe {
        graft_model_free(m);
        graft_session_free(s);
    }
}

fn logits_of(s: *const graft_session, i: usize) -> Vec<f32> {
    let (mut p, mut n) = (ptr::null(), 0usize);
    // SAFETY: live session, valid out pointers.
    let st = unsafe { graft_get_logits(s, i, &mut p, &mut n) };
    assert_eq!(st, GRAFT_OK, "{}", last_error());
    // SAFETY: graft returned a row of `n` floats, valid until the next decode.
    unsafe { std::slice::from_raw_parts(p, n) }.to_vec()
}

#[test]
fn batched_decode_matches_each_sequence_alone() {
    let m = load();
    let (a, b) = (
        tokenize(m, "The quick brown fox"),
        tokenize(m, "Once upon a time"),
    );
    let mut s = ptr::null_mut();
    // SAFETY: live model, default options, valid out pointer.
    assert_eq!(
        unsafe { graft_session_create(m, ptr::null(), &mut s) },
        GRAFT_OK
    );
    let batch = |toks: &[u32], seq: u32| -> Vec<graft_batch_token> {
        toks.iter()
            .enumerate()
            .map(|(i, &token)| graft_batch_token {
                token,
                seq,
                logits: i + 1 == toks.len(),
            })
            .collect()
    };
    let mut alone = Vec::new();
    for (toks, seq) in [(&a, 1), (&b, 2)] {
        let bt = batch(toks, seq);
        // SAFETY: live session, batch slice.
        assert_eq!(
            unsafe { graft_decode(s, bt.as_ptr(), bt.len()) },
            GRAFT_OK,
            "{}",
            last_error()
        );
        alone.push(logits_of(s, bt.len() - 1));
        // SAFETY: live session.
        assert_eq!(unsafe { graft_session_seq_remove(s, seq) }, GRAFT_OK);
    }
    let mut both = batch(&a, 1);
    both.extend(batch(&b, 2));
    // SAFETY: live session, batch slice.
    assert_eq!(
        unsafe { graft_decode(s, both.as_ptr(), both.len()) },
        GRAFT_OK
    );
    for (got, want) in [
        (logits_of(s, a.len() - 1), &alone[0]),
        (logits_of(s, both.len() - 1), &alone[1]),
    ] {
        let diff = got
            .iter()
            .zip(want.iter())
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-3, "batched vs alone differ by {diff}");
    }
    let mut len = 0;
    // SAFETY: live session, valid out pointer.
    assert_eq!(unsafe { graft_session_seq_len(s, 2, &mut len) }, GRAFT_OK);
    assert_eq!(len, b.len());
    // SAFETY: NULL handles are refused, not dereferenced.
    assert_eq!(
        unsafe { graft_decode(ptr::null(), both.as_ptr(), 1) },
        GRAFT_ERR_INVALID_ARGUMENT
    );
    // SAFETY: handles created above, each freed once.
    unsafe {
        graft_session_free(s);
        graft_model_free(m);
    }
}
