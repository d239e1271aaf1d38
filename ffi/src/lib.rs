//! graft's C ABI. The header `ffi/include/graft.h` is generated from this crate with
//! cbindgen (`cargo run -p graft-ffi-gen-header`); its preamble (from
//! `ffi/cbindgen.toml`) states the ownership, string and thread-safety rules.
//!
//! Every entry point checks its pointers, runs inside [`error::guard`] (which catches
//! panics) and reports failures as a [`graft_status`] plus a thread-local message.

#![allow(non_camel_case_types)]

mod error;

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, TryLockError};

use graft_adapters::train::job::{self, Control, JobReport, JobSpec, Progress};
use graft_adapters::train::TrainError;
use graft_adapters::{load_adapter, AdapterStack, Registry, RegistryLimits};
use graft_runtime::kv_cache::{KvCache, KvType};
use graft_runtime::model::{sequence_batch, BatchDeltas, BatchToken, Logits, Model, Scratch};
use graft_runtime::sampling::{Sampler, SamplingParams};
use graft_runtime::tokenizer::Tokenizer;

pub use error::graft_status;
use error::{guard, guard_value, Error, Result};
use graft_status::*;

/// Version of the C ABI described by graft.h; bumped on any incompatible change.
pub const GRAFT_ABI_VERSION: u32 = 1;

/// KV cache element type for `graft_session_options.kv_type`.
pub const GRAFT_KV_F16: u32 = 0;
/// KV cache element type for `graft_session_options.kv_type`.
pub const GRAFT_KV_F32: u32 = 1;

/// Prompt tokens per forward step during prefill: bounds scratch memory.
const PREFILL_CHUNK: usize = 512;

// ---------------------------------------------------------------------------------
// Handles and plain structs
// ---------------------------------------------------------------------------------

/// A loaded model: weights, tokenizer and its adapter registry. Opaque.
pub struct graft_model {
    inner: Arc<ModelInner>,
}

struct ModelInner {
    model: Model,
    tokenizer: Tokenizer,
    registry: Registry,
    /// Worker pool for this model's work; None = rayon's global pool.
    pool: Option<rayon::ThreadPool>,
}

impl ModelInner {
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        match &self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }
}

/// A KV cache holding one or more sequences, plus the adapters active on it. Opaque.
pub struct graft_session {
    model: Arc<ModelInner>,
    /// Set by `graft_session_cancel` (from any thread); read between tokens.
    cancel: AtomicBool,
    inner: Mutex<SessionInner>,
}

struct SessionInner {
    cache: KvCache,
    scratch: Scratch,
    /// The active adapters, resolved when activated: later replaces or unloads in the
    /// registry do not change them.
    adapters: Option<AdapterStack>,
    /// Logits of the last `graft_decode`.
    logits: Logits,
}

/// Options for `graft_model_load`; fill with `graft_model_options_default` first.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct graft_model_options {
    /// Worker threads for this model's work; 0 = one per core (shared global pool).
    pub n_threads: usize,
    /// Execution provider, NUL-terminated; NULL or "cpu". Others give
    /// GRAFT_ERR_UNSUPPORTED.
    pub provider: *const c_char,
    /// Memory-map the weights (zero-copy). Must be true: GGUF weights are always
    /// mapped in this build; false gives GRAFT_ERR_UNSUPPORTED.
    pub use_mmap: bool,
}

/// Facts about a loaded model.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct graft_model_info {
    pub n_vocab: u32,
    pub n_layer: u32,
    pub n_embd: u32,
    /// Context length the model was trained with (0 if unknown).
    pub n_ctx_train: u32,
    /// Beginning-of-sequence token, or -1.
    pub bos: i32,
    /// End-of-sequence token, or -1.
    pub eos: i32,
}

/// Options for `graft_session_create`; fill with `graft_session_options_default` first.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct graft_session_options {
    /// KV cache capacity in tokens, shared by all sequences of the session (> 0).
    pub n_ctx: usize,
    /// GRAFT_KV_F16 or GRAFT_KV_F32.
    pub kv_type: u32,
}

/// Sampling and length settings for `graft_generate`; fill with
/// `graft_generate_params_default` (greedy, 128 tokens) first.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct graft_generate_params {
    pub max_tokens: usize,
    /// <= 0 means greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: u32,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
    /// 1 = off.
    pub repetition_penalty: f32,
    pub seed: u64,
    /// Keep going past end-of-generation tokens.
    pub ignore_eos: bool,
}

/// Why generation ended.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum graft_finish_reason {
    /// `max_tokens` reached.
    GRAFT_FINISH_LENGTH = 0,
    /// An end-of-generation token.
    GRAFT_FINISH_STOP = 1,
    /// The callback returned false or `graft_session_cancel` was called.
    GRAFT_FINISH_CANCELLED = 2,
}

/// What `graft_generate` produced.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct graft_generate_result {
    /// Tokens generated (all of them, even if more than the output buffer holds).
    pub n_tokens: usize,
    pub finish: graft_finish_reason,
}

/// Called once per generated token, with its id and the text that became final with
/// it (UTF-8, `piece_len` bytes, NUL-terminated; may be empty while a multi-byte
/// character is incomplete). Return false to stop generation. It runs on the calling
/// thread while the session is in use: it must not call graft functions on the same
/// session (they fail with GRAFT_ERR_BUSY), and must not unwind (C++ exceptions,
/// longjmp) through graft.
pub type graft_token_callback = Option<
    unsafe extern "C" fn(
        token: u32,
        piece: *const c_char,
        piece_len: usize,
        user_data: *mut c_void,
    ) -> bool,
>;

/// One token of a `graft_decode` batch.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct graft_batch_token {
    pub token: u32,
    /// Sequence id; the token goes at that sequence's next position.
    pub seq: u32,
    /// Whether to keep this token's logits (see `graft_get_logits`).
    pub logits: bool,
}

/// An adapter to activate on a session: a loaded adapter's name (NUL-terminated) and
/// its scale.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct graft_adapter_ref {
    pub name: *const c_char,
    pub scale: f32,
}

// ---------------------------------------------------------------------------------
// Argument helpers
// ---------------------------------------------------------------------------------

fn non_null<T>(p: *const T, what: &str) -> Result<()> {
    if p.is_null() {
        Err(Error::invalid(format!("{what} is NULL")))
    } else {
        Ok(())
    }
}

/// # Safety
/// `p` must be NULL or point to a NUL-terminated string valid for the call.
unsafe fn c_str<'a>(p: *const c_char, what: &str) -> Result<&'a str> {
    non_null(p, what)?;
    // SAFETY: non-NULL checked above; NUL termination is the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map_err(|_| Error::invalid(format!("{what} is not valid UTF-8")))
}

/// # Safety
/// `p` must be NULL (then `len` must be 0) or point to `len` readable elements.
unsafe fn slice<'a, T>(p: *const T, len: usize, what: &str) -> Result<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    non_null(p, what)?;
    // SAFETY: non-NULL and `len` readable elements per the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// # Safety
/// `h` must be NULL or a live handle from `graft_model_load`.
unsafe fn model_ref<'a>(h: *const graft_model) -> Result<&'a Arc<ModelInner>> {
    non_null(h, "model")?;
    // SAFETY: non-NULL, and a live handle per the caller's contract.
    Ok(unsafe { &(*h).inner })
}

/// # Safety
/// `h` must be NULL or a live handle from `graft_session_create`.
unsafe fn session_ref<'a>(h: *const graft_session) -> Result<&'a graft_session> {
    non_null(h, "session")?;
    // SAFETY: non-NULL, and a live handle per the caller's contract.
    Ok(unsafe { &*h })
}

impl graft_session {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, SessionInner>> {
        match self.inner.try_lock() {
            Ok(g) => Ok(g),
            Err(TryLockError::WouldBlock) => Err(Error::new(
                GRAFT_ERR_BUSY,
                "session is in use by another call (use one session per thread, and do not call it from its own callback)",
            )),
            Err(TryLockError::Poisoned(_)) => Err(Error::new(
                GRAFT_ERR_INTERNAL,
                "session is unusable after an internal error; free it",
            )),
        }
    }
}

/// Writes `value` through `out` if it is not NULL.
///
/// # Safety
/// `out` must be NULL or valid for a write of `T`.
unsafe fn write_opt<T>(out: *mut T, value: T) {
    if !out.is_null() {
        // SAFETY: non-NULL and writable per the caller's contract.
        unsafe { out.write(value) };
    }
}

/// Copies `data` into a caller buffer of `capacity` elements after writing the
/// required length to `len_out`. A NULL buffer with capacity 0 is a size query.
///
/// # Safety
/// `buf` must be NULL or valid for `capacity` writes; `len_out` valid for a write.
unsafe fn copy_out<T: Copy>(
    data: &[T],
    buf: *mut T,
    capacity: usize,
    len_out: *mut usize,
) -> Result<()> {
    // SAFETY: checked non-NULL by the callers.
    unsafe { len_out.write(data.len()) };
    if buf.is_null() {
        if capacity == 0 {
            return Ok(());
        }
        return Err(Error::invalid(
            "output buffer is NULL but its capacity is not 0",
        ));
    }
    if capacity < data.len() {
        return Err(Error::new(
            GRAFT_ERR_BUFFER_TOO_SMALL,
            format!("output buffer holds {capacity}, {} needed", data.len()),
        ));
    }
    // SAFETY: `buf` holds at least `data.len()` elements (checked above) and cannot
    // overlap `data`, which graft owns.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf, data.len()) };
    Ok(())
}

// ---------------------------------------------------------------------------------
// Version and errors
// ---------------------------------------------------------------------------------

/// The library version, e.g. "0.1.0" (static, NUL-terminated).
#[no_mangle]
pub extern "C" fn graft_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The ABI version this library implements (GRAFT_ABI_VERSION of its header).
#[no_mangle]
pub extern "C" fn graft_abi_version() -> u32 {
    GRAFT_ABI_VERSION
}

/// This thread's message for the last failed call ("" after a successful one).
/// NUL-terminated UTF-8, owned by graft, valid until the next graft call on this
/// thread. Never NULL.
#[no_mangle]
pub extern "C" fn graft_last_error() -> *const c_char {
    guard_value(c"".as_ptr(), error::last_error_ptr)
}

/// A short constant name for a status, e.g. "GRAFT_ERR_IO" (static, never NULL).
#[no_mangle]
pub extern "C" fn graft_status_name(status: graft_status) -> *const c_char {
    let s: &CStr = match status {
        GRAFT_OK => c"GRAFT_OK",
        GRAFT_ERR_INVALID_ARGUMENT => c"GRAFT_ERR_INVALID_ARGUMENT",
        GRAFT_ERR_IO => c"GRAFT_ERR_IO",
        GRAFT_ERR_FORMAT => c"GRAFT_ERR_FORMAT",
        GRAFT_ERR_NOT_FOUND => c"GRAFT_ERR_NOT_FOUND",
        GRAFT_ERR_CANCELLED => c"GRAFT_ERR_CANCELLED",
        GRAFT_ERR_CAPACITY => c"GRAFT_ERR_CAPACITY",
        GRAFT_ERR_UNSUPPORTED => c"GRAFT_ERR_UNSUPPORTED",
        GRAFT_ERR_INCOMPATIBLE => c"GRAFT_ERR_INCOMPATIBLE",
        GRAFT_ERR_BUFFER_TOO_SMALL => c"GRAFT_ERR_BUFFER_TOO_SMALL",
        GRAFT_ERR_CONFLICT => c"GRAFT_ERR_CONFLICT",
        GRAFT_ERR_BUSY => c"GRAFT_ERR_BUSY",
        GRAFT_ERR_INTERNAL => c"GRAFT_ERR_INTERNAL",
    };
    s.as_ptr()
}

// ---------------------------------------------------------------------------------
// Models
// ---------------------------------------------------------------------------------

/// Default model options: all cores, "cpu", mmap on.
#[no_mangle]
pub extern "C" fn graft_model_options_default() -> graft_model_options {
    graft_model_options {
        n_threads: 0,
        provider: std::ptr::null(),
        use_mmap: true,
    }
}

/// Loads a model (GGUF file, HF checkpoint directory or llama2.c checkpoint) and its
/// tokenizer. `path` is NUL-terminated UTF-8; `options` may be NULL (defaults). On
/// success `*out` is a new handle to free with `graft_model_free`; on failure it is
/// set to NULL. Missing file: GRAFT_ERR_IO; invalid or truncated file:
/// GRAFT_ERR_FORMAT.
///
/// # Safety
/// Pointers must be NULL or valid as described.
#[no_mangle]
pub unsafe extern "C" fn graft_model_load(
    path: *const c_char,
    options: *const graft_model_options,
    out: *mut *mut graft_model,
) -> graft_status {
    guard(|| {
        non_null(out, "out")?;
        // SAFETY: `out` is non-NULL and writable per the contract.
        unsafe { out.write(std::ptr::null_mut()) };
        // SAFETY: NUL-terminated string per the contract.
        let path = unsafe { c_str(path, "path") }?;
        let opts = if options.is_null() {
            graft_model_options_default()
        } else {
            // SAFETY: non-NULL and readable per the contract.
            unsafe { options.read() }
        };
        if !opts.provider.is_null() {
            // SAFETY: NUL-terminated string per the contract.
            let p = unsafe { c_str(opts.provider, "options.provider") }?;
            if p != "cpu" {
                return Err(Error::new(
                    GRAFT_ERR_UNSUPPORTED,
                    format!("provider {p:?} is not available in this build (available: \"cpu\")"),
                ));
            }
        }
        if !opts.use_mmap {
            return Err(Error::new(
                GRAFT_ERR_UNSUPPORTED,
                "use_mmap = false: this build always memory-maps GGUF weights",
            ));
        }
        let pool = match opts.n_threads {
            0 => None,
            n => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .map_err(|e| Error::new(GRAFT_ERR_INTERNAL, format!("thread pool: {e}")))?,
            ),
        };
        let model = Model::load(&PathBuf::from(path), None)?;
        let tokenizer = match &model.gguf {
            Some(g) => Tokenizer::from_gguf(g)?,
            None => {
                return Err(Error::new(
                    GRAFT_ERR_UNSUPPORTED,
                    format!(
                    "{path}: the C API needs a GGUF model (its tokenizer is read from the file)"
                ),
                ))
            }
        };
        let inner = ModelInner {
            model,
            tokenizer,
            registry: Registry::new(RegistryLimits::unlimited()),
            pool,
        };
        let handle = Box::new(graft_model {
            inner: Arc::new(inner),
        });
        // SAFETY: `out` is non-NULL and writable (checked above).
        unsafe { out.write(Box::into_raw(handle)) };
        Ok(())
    })
}

/// Releases a model handle (NULL is a no-op). Sessions created from it stay valid:
/// they keep the weights alive until they are freed.
///
/// # Safety
/// `model` must be NULL or a handle not yet freed, and not in use by another thread.
#[no_mangle]
pub unsafe extern "C" fn graft_model_free(model: *mut graft_model) {
    guard_value((), || {
        if !model.is_null() {
            // SAFETY: created by Box::into_raw in graft_model_load, freed once.
            drop(unsafe { Box::from_raw(model) });
        }
    })
}

/// Fills `*out` with facts about the model.
///
/// # Safety
/// Pointers must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn graft_model_get_info(
    model: *const graft_model,
    out: *mut graft_model_info,
) -> graft_status {
    guard(|| {
        // SAFETY: live handle or NULL per the contract.
        let m = unsafe { model_ref(model) }?;
        non_null(out, "out")?;
        let c = &m.model.config;
        let tok = |t: Option<u32>| t.and_then(|t| i32::try_from(t).ok()).unwrap_or(-1);
        let info = graft_model_info {
            n_vocab: u32::try_from(c.n_vocab).unwrap_or(u32::MAX),
            n_layer: u32::try_from(c.n_layer).unwrap_or(u32::MAX),
            n_embd: u32::try_from(c.n_embd).unwrap_or(u32::MAX),
            n_ctx_train: u32::try_from(c.n_ctx_train).unwrap_or(u32::MAX),
            bos: tok(m.tokenizer.bos()),
            eos: tok(m.tokenizer.eos()),
        };
        // SAFETY: non-NULL (checked) and writable per the contract.
        unsafe { out.write(info) };
        Ok(())
    })
}

/// Whether `token` ends generation (EOS, EOT, ...). False for NULL or bad ids.
///
/// # Safety
/// `model` must be NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn graft_token_is_eog(model: *const graft_model, token: u32) -> bool {
    guard_value(false, || {
        // SAFETY: live handle or NULL per the contract.
        unsafe { model_ref(model) }.is_ok_and(|m| m.tokenizer.is_eog(token))
    })
}

// ---------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------

/// Tokenizes `text_len` bytes of UTF-8 at `text` (not NUL-terminated; NULL allowed
/// when `text_len` is 0). `add_special` adds BOS (if the model wants it);
/// `parse_special` turns special-token text such as "<|im_start|>" into its token.
/// `*n_tokens` receives the token count; the tokens go to `tokens` if it holds that
/// many (else GRAFT_ERR_BUFFER_TOO_SMALL). Pass `tokens` NULL and `capacity` 0 to
/// query the count.
///
/// # Safety
/// Pointers must be NULL or valid for the given lengths.
#[no_mangle]
pub unsafe extern "C" fn graft_tokenize(
    model: *const graft_model,
    text: *const c_char,
    text_len: usize,
    add_special: bool,
    parse_special: bool,
    tokens: *mut u32,
    capacity: usize,
    n_tokens: *mut usize,
) -> graft_status {
    guard(|| {
        // SAFETY: live handle or NULL per the contract.
        let m = unsafe { model_ref(model) }?;
        non_null(n_tokens, "n_tokens")?;
        // SAFETY: `text_len` readable bytes per the contract.
        let bytes = unsafe { slice(text.cast::<u8>(), text_len, "text") }?;
        let text = std::str::from_utf8(bytes)
            .map_err(|e| Error::invalid(format!("text is not valid UTF-8: {e}")))?;
        let ids = m.tokenizer.encode(text, add_special, parse_special);
        // SAFETY: buffer and count pointer valid per the contract (count non-NULL).
        unsafe { copy_out(&ids, tokens, capacity, n_tokens) }
    })
}

/// Turns tokens back into text. `special` renders special tokens (BOS, EOS...) as
/// their text instead of dropping them. `*text_len` receives the byte length
/// (without the NUL); the text plus a terminating NUL goes to `buf` if it holds
/// `*text_len + 1` bytes (else GRAFT_ERR_BUFFER_TOO_SMALL). Pass `buf` NULL and
/// `capacity` 0 to query. Invalid UTF-8 from byte tokens is replaced by U+FFFD.
/// An id outside the vocabulary gives GRAFT_ERR_INVALID_ARGUMENT.
///
/// # Safety
/// Pointers must be NULL or valid for the given lengths.
#[no_mangle]
pub unsafe extern "C" fn graft_detokenize(
    model: *const graft_model,
    tokens: *const u32,
    n_tokens: usize,
    special: bool,
    buf: *mut c_char,
    capacity: usize,
    text_len: *mut usize,
) -> graft_status {
    guard(|| {
        // SAFETY: live handle or NULL per the contract.
        let m = unsafe { model_ref(model) }?;
        non_null(text_len, "text_len")?;
        // SAFETY: `n_tokens` readable ids per the contract.
        let ids = unsafe { slice(tokens, n_tokens, "tokens") }?;
        let n_vocab = m.tokenizer.n_vocab();
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(Error::invalid(format!(
                "token {bad} is outside the vocabulary (size {n_vocab})"
            )));
        }
        let text = m.tokenizer.decode_with(ids, special);
        let mut bytes = text.into_bytes();
        bytes.push(0);
        let mut needed = 0usize;
        // SAFETY: buffer valid for `capacity` bytes, `needed` is a local.
        let r = unsafe { copy_out(&bytes, buf.cast::<u8>(), capacity, &mut needed) };
        // SAFETY: non-NULL (checked) and writable per the contract.
        unsafe { text_len.write(needed - 1) };
        r
    })
}

// ---------------------------------------------------------------------------------
// Adapters (per model; thread-safe)
// ---------------------------------------------------------------------------------

/// Whether `path` is a GGUF file made for an architecture other than `arch`: the
/// loader reports that as an invalid file, the C API as an incompatible adapter.
fn other_architecture(path: &std::path::Path, arch: &str) -> bool {
    if !graft_runtime::gguf::has_gguf_magic(path) {
        return false;
    }
    graft_runtime::gguf::GgufFile::open(path)
        .ok()
        .and_then(|f| f.architecture().ok().map(|a| a != arch))
        .unwrap_or(false)
}

fn load_checked(m: &ModelInner, path: &str) -> Result<graft_adapters::Adapter> {
    let p = PathBuf::from(path);
    let adapter = m.run(|| load_adapter(&p, &m.model)).map_err(|e| {
        let wrong_arch = other_architecture(&p, m.model.config.arch.name());
        let mut err = Error::from(e);
        if wrong_arch {
            err.status = GRAFT_ERR_INCOMPATIBLE;
        }
        err
    })?;
    if adapter.n_layer() != m.model.config.n_layer {
        return Err(Error::new(
            GRAFT_ERR_INCOMPATIBLE,
            format!(
                "{path}: adapter built for {} layers, the model has {}",
                adapter.n_layer(),
                m.model.config.n_layer
            ),
        ));
    }
    Ok(adapter)
}

/// Loads an adapter file (GGUF LoRA, PEFT directory or SaRA .safetensors) and
/// publishes it under `name` (both NUL-terminated UTF-8), replacing any adapter of
/// that name. Sessions that activated an earlier version keep it. `*generation`
/// (may be NULL) receives the new version number. An adapter for another
/// architecture or shape gives GRAFT_ERR_INCOMPATIBLE.
///
/// # Safety
/// Pointers must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn graft_adapter_load(
    model: *const graft_model,
    name: *const c_char,
    path: *const c_char,
    generation: *mut u64,
) -> graft_status {
    guard(|| {
        // SAFETY: live handle or NULL per the contract.
        let m = unsafe { model_ref(model) }?;
        // SAFETY: NUL-terminated strings per the contract.
        let (name, path) = unsafe { (c_str(name, "name")?, c_str(path, "path")?) };
        let adapter = load_checked(m, path)?;
        let g = m.registry.insert(name, adapter)?;
        // SAFETY: NULL or writable per the contract.
        unsafe { write_opt(generation, g.0) };
        Ok(())
    })
}

/// Replaces the loaded adapter `name` with the one in `path`, only if `name` is
/// loaded (else GRAFT_ERR_NOT_FOUND) and was not replaced meanwhile by another
/// thread (else GRAFT_ERR_CONFLICT). `*generation` (may be NULL) receives the new
/// version number.
///
/// # Safety
/// Pointers must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn graft_adapter_replace(
    model: *const graft_model,
    name: *const c_char,
    path: *const c_char,
    generation: *mut u64,
) -> graft_status {
    guard(|| {
        // SAFETY: live handle or NULL per the contract.
        let m = unsafe { model_ref(model) }?;
        // SAFETY: NUL-terminated strings per the contract.
        let (name, path) = unsafe { (c_str(name, "name")?, c_str(path, "path")?) };
        let Some(current) = m.registry.generation(name) else {
            return Err(Error::new(
                GRAFT_ERR_NOT_FOUND,
                format!("no adapter named {name:?} is loaded"),
            ));
        };
        let adapter = load_checked(m, path)?;
        let g = m.registry.replace(name, current, adapter)?;
        // SAFETY: NULL or writable per the contract.
        unsafe { write_opt(generation, g.0) };
        Ok(())
    })
}

/// Unloads adapter `name` (GRAFT_ERR_NOT_FOUND if it is not loaded). Sessions that
/// activated it keep their version until they change their adapters.
///
/// # Safety
/// Pointers must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn graft_adapter_unload(
    model: *const graft_model,
    name: *const c_char,
) -> graft_status {
    guard(|| {
        // SAFETY: live handle or NULL per the contract.
        let m = unsafe { model_ref(model) }?;
        // SAFETY: NUL-terminated string per the contract.
        let name = unsafe { c_str(name, "name") }?;
        m.registry.unload(name)?;
        Ok(())
    })
}

/// The number of adapters loaded on the model (0 for NULL).
///
/// # Safety
/// `model` must be NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn graft_adapter_count(model: *const graft_model) -> usize {
    guard_value(0, || {
        // SAFETY: live handle or NULL per the contract.
        unsafe { model_ref(model) }.map_or(0, |m| m.registry.len())
    })
}

// ---------------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------------

/// Default session options: 2048 tokens of KV cache in f16.
#[no_mangle]
pub extern "C" fn graft_session_options_default() -> graft_session_options {
    graft_session_options {
        n_ctx: 2048,
        kv_type: GRAFT_KV_F16,
    }
}

/// Creates a session on `model` (`options` may be NULL for defaults). The session
/// keeps the model's weights alive, so the model handle may be freed first. Free it
/// with `graft_session_free`.
///
/// # Safety
/// Pointers must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn graft_session_create(
    model: *const graft_model,
    options: *const graft_session_options,
    out: *mut *mut graft_session,
) -> graft_status {
    guard(|| {
        non_null(out, "out")?;
        // SAFETY: non-NULL and writable per the contract.
        unsafe { out.write(std::ptr::null_mut()) };
        // SAFETY: live handle or NULL per the contract.
        let m = unsafe { model_ref(model) }?;
        let opts = if options.is_null() {
            graft_session_options_default()
        } else {
            // SAFETY: non-NULL and readable per the contract.
            unsafe { options.read() }
        };
        if opts.n_ctx == 0 || opts.n_ctx > (1 << 24) {
            return Err(Error::invalid(format!(
                "n_ctx {} is not in 1..=16777216",
                opts.n_ctx
            )));
        }
        let kv = match opts.kv_type {
            GRAFT_KV_F16 => KvType::F16,
            GRAFT_KV_F32 => KvType::F32,
            t => {
                return Err(Error::invalid(format!(
                    "kv_type {t} is not GRAFT_KV_F16 or GRAFT_KV_F32"
                )))
            }
        };
        let cache = m.model.new_cache(opts.n_ctx, kv);
        let s = Box::new(graft_session {
            model: Arc::clone(m),
            cancel: AtomicBool::new(false),
            inner: Mutex::new(SessionInner {
                cache,
                scratch: Scratch::default(),
                adapters: None,
                logits: Logits::default(),
            }),
        });
        // SAFETY: `out` non-NULL and writable (checked above).
        unsafe { out.write(Box::into_raw(s)) };
        Ok(())
    })
}

/// Frees a session (NULL is a no-op).
///
/// # Safety
/// `session` must be NULL or a handle not yet freed, and not in use by any thread.
#[no_mangle]
pub unsafe extern "C" fn graft_session_free(session: *mut graft_session) {
    guard_value((), || {
        if !session.is_null() {
            // SAFETY: created by Box::into_raw in graft_session_create, freed once.
            drop(unsafe { Box::from_raw(session) });
        }
    })
}

/// Activates adapters on the session: `n` (name, scale) pairs, stacked; `n` = 0
/// turns adapters off. The current version of each is taken now: later replaces or
/// unloads do not affect the session until it calls this again. A name that is not
/// loaded gives GRAFT_ERR_NOT_FOUND and leaves the active set unchanged. Scale 0
/// makes an adapter a no-op.
///
/// # Safety
/// Pointers must be NULL or valid; each name NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn graft_session_set_adapters(
    session: *const graft_session,
    adapters: *const graft_adapter_ref,
    n: usize,
) -> graft_status {
    guard(|| {
        // SAFETY: live handle or NULL per the contract.
        let s = unsafe { session_ref(session) }?;
        // SAFETY: `n` readable entries per the contract.
        let refs = unsafe { slice(adapters, n, "adapters") }?;
        let mut members = Vec::with_capacity(refs.len());
        for (i, r) in refs.iter().enumerate() {
            // SAFETY: NUL-terminated string per the contract.
            let name = unsafe { c_str(r.name, &format!("adapters[{i}].name")) }?;
            if !r.scale.is_finite() {
                return Err(Error::invalid(format!("adapters[{i}].scale is not finite")));
            }
            members.push((name, r.scale));
        }
        let mut inner = s.lock()?;
        inner.adapters = if members.is_empty() {
            None
        } else {
            Some(s.model.registry.resolve(&members)?)
        };
        Ok(())
    })
}

/// Asks a `graft_generate` running on this session (on another thread) to stop
/// after its current token; it then returns GRAFT_ERR_CANCELLED. The only session
/// function that may be called concurrently with others on the same session. A
/// generate call that starts later clears the request.
///
/// # Safety
/// `session` must be NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn graft_session_cancel(session: *const graft_session) -> graft_status {
    guard(|| {
        // SAFETY: live handle or NULL per the contract.
        let s = unsafe { session_ref(session) }?;
        s.cancel.store(true, Ordering::SeqCst);
        Ok(())
    })
}

/// Forgets sequence `seq` (its cache blocks are freed; unknown ids are a no-op).
///
/// # Safety
/// `session` must be NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn graft_session_seq_remove(
    session: *const graft_session,
    seq: u32,
) -> graft_status {
    guard(|| {
        // SAFETY: live handle or NULL per the contract.
        let s = unsafe { session_ref(session) }?;
        s.lock()?.cache.remove(seq);
        Ok(())
    })
}

/// The number of tokens sequence `seq` holds (its next position) into `*len`.
///
/// # Safety
/// Pointers must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn graft_session_seq_len(
    session: *const graft_session,
    seq: u32,
    len: *mut usize,
) -> graft_status {
    guard(|| {
        // SAFETY: live handle or NULL per the contract.
        let s = unsafe { session_ref(session) }?;
        non_null(len, "len")?;
        let n = s.lock()?.cache.seq_len(seq);
        // SAFETY: non-NULL (checked) and writable per the contract.
        unsafe { len.write(n) };
        Ok(())
    })
}

// ---------------------------------------------------------------------------------
// Generation
// ---------------------------------------------------------------------------------

/// Default generation parameters: greedy, 128 tokens, stop at end of generation.
#[no_mangle]
pub extern "C" fn graft_generate_params_default() -> graft_generate_params {
    let g = SamplingParams::greedy();
    graft_generate_params {
        max_tokens: 128,
        temperature: g.temperature,
        top_k: 0,
        top_p: g.top_p,
        min_p: g.min_p,
        repetition_penalty: g.repetition_penalty,
        seed: g.seed,
        ignore_eos: false,
    }
}

/// The sequence `graft_generate` runs on (it is cleared first).
pub const GRAFT_GENERATE_SEQ: u32 = 0;

/// Generates a continuation of `prompt` (`n_prompt` > 0 tokens) on sequence
/// GRAFT_GENERATE_SEQ of the session, which is cleared first, through the
/// session's active adapters. `params` may be NULL (defaults). `callback` (may be
/// NULL) sees each token as it is produced and can stop generation. Generated tokens
/// are written to `out_tokens` (up to `capacity`; may be NULL with capacity 0);
/// `*result` (may be NULL) receives the count and why generation ended. Returns
/// GRAFT_ERR_CANCELLED (with `*result` filled) when the callback or
/// `graft_session_cancel` stopped it, GRAFT_ERR_CAPACITY when the KV cache is too
/// small for prompt + max_tokens.
///
/// # Safety
/// Pointers must be NULL or valid for the given lengths.
#[no_mangle]
pub unsafe extern "C" fn graft_generate(
    session: *const graft_session,
    prompt: *const u32,
    n_prompt: usize,
    params: *const graft_generate_params,
    callback: graft_token_callback,
    user_data: *mut c_void,
    out_tokens: *mut u32,
    capacity: usize,
    result: *mut graft_generate_result,
) -> graft_status {
    guard(|| {
        // SAFETY: live handle or NULL per the contract.
        let s = unsafe { session_ref(session) }?;
        // SAFETY: `n_prompt` readable ids per the contract.
        let prompt = unsafe { slice(prompt, n_prompt, "prompt") }?;
        if prompt.is_empty() {
            return Err(Error::invalid("empty prompt: at least one token is needed"));
        }
        if out_tokens.is_null() && capacity != 0 {
            return Err(Error::invalid("out_tokens is NULL but capacity is not 0"));
        }
        let p = if params.is_null() {
            graft_generate_params_default()
        } else {
            // SAFETY: non-NULL and readable per the contract.
            unsafe { params.read() }
        };
        let sampling = SamplingParams {
            temperature: p.temperature,
            top_k: p.top_k as usize,
            top_p: p.top_p,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            seed: p.seed,
            ..SamplingParams::greedy()
        };
        let mut inner = s.lock()?;
        s.cancel.store(false, Ordering::SeqCst);
        let m = &s.model;
        let mut out = Vec::new();
        let mut on_token = |token: u32, piece: &str| -> bool {
            out.push(token);
            match callback {
                None => true,
                Some(cb) => {
                    let mut buf = Vec::with_capacity(piece.len() + 1);
                    buf.extend_from_slice(piece.as_bytes());
                    buf.push(0);
                    // SAFETY: a C function pointer given by the caller; `buf` is a
                    // NUL-terminated copy that lives across the call.
                    unsafe { cb(token, buf.as_ptr().cast(), piece.len(), user_data) }
                }
            }
        };
        // The loop (and the callback) stays on the caller's thread; only forward
        // passes run in the model's pool.
        let finish = generate_loop(
            m,
            &mut inner,
            &s.cancel,
            prompt,
            p.max_tokens,
            p.ignore_eos,
            sampling,
            &mut on_token,
        )?;
        let n = out.len();
        if !out_tokens.is_null() {
            let k = n.min(capacity);
            // SAFETY: `out_tokens` holds `capacity` >= k elements per the contract.
            unsafe { std::ptr::copy_nonoverlapping(out.as_ptr(), out_tokens, k) };
        }
        // SAFETY: NULL or writable per the contract.
        unsafe {
            write_opt(
                result,
                graft_generate_result {
                    n_tokens: n,
                    finish,
                },
            )
        };
        if finish == graft_finish_reason::GRAFT_FINISH_CANCELLED {
            return Err(Error::new(
                GRAFT_ERR_CANCELLED,
                format!("generation cancelled after {n} tokens"),
            ));
        }
        Ok(())
    })
}

#[allow(clippy::too_many_arguments)]
fn generate_loop(
    m: &ModelInner,
    inner: &mut SessionInner,
    cancel: &AtomicBool,
    prompt: &[u32],
    max_tokens: usize,
    ignore_eos: bool,
    sampling: SamplingParams,
    on_token: &mut dyn FnMut(u32, &str) -> bool,
) -> Result<graft_finish_reason> {
    let SessionInner {
        cache,
        scratch,
        adapters,
        logits: kept,
    } = inner;
    *kept = Logits::default();
    let seq = GRAFT_GENERATE_SEQ;
    cache.remove(seq);
    let n_vocab = m.model.config.n_vocab;
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= n_vocab) {
        return Err(Error::invalid(format!(
            "prompt token {bad} is outside the vocabulary (size {n_vocab})"
        )));
    }
    let total = prompt.len().saturating_add(max_tokens);
    cache.reserve(seq, total)?;
    let mut sampler = Sampler::new(sampling, n_vocab)?;
    for &t in prompt {
        sampler.accept(t);
    }
    let delta = adapters
        .as_ref()
        .map(|a| a as &dyn graft_adapters::LinearDelta);
    let step = |batch: &[BatchToken], cache: &mut KvCache, scratch: &mut Scratch| {
        m.run(|| {
            let d = delta.map(|d| BatchDeltas::uniform(d, batch.len()));
            m.model.forward_adapted(batch, cache, scratch, d.as_ref())
        })
    };
    let mut logits = Vec::new();
    for (ci, chunk) in prompt.chunks(PREFILL_CHUNK).enumerate() {
        let batch = sequence_batch(chunk, seq, ci * PREFILL_CHUNK, false);
        let out = step(&batch, cache, scratch)?;
        logits = out.row(0).to_vec();
    }
    let mut decoder = m.tokenizer.stream_decoder();
    let mut pos = prompt.len();
    let mut produced = 0usize;
    while produced < max_tokens {
        let next = sampler.try_sample(&logits)?;
        sampler.accept(next);
        if m.tokenizer.is_eog(next) && !ignore_eos {
            return Ok(graft_finish_reason::GRAFT_FINISH_STOP);
        }
        produced += 1;
        let piece = decoder.push(next);
        if !on_token(next, &piece) || cancel.load(Ordering::SeqCst) {
            return Ok(graft_finish_reason::GRAFT_FINISH_CANCELLED);
        }
        if produced == max_tokens {
            break;
        }
        let batch = [BatchToken {
            token: next,
            pos,
            seq,
            logits: true,
        }];
        let out = step(&batch, cache, scratch)?;
        logits.clear();
        logits.extend_from_slice(out.row(0));
        pos += 1;
    }
    Ok(graft_finish_reason::GRAFT_FINISH_LENGTH)
}

// ---------------------------------------------------------------------------------
// Batched decode and logits
// ---------------------------------------------------------------------------------

/// Runs one forward step over `n` tokens that may belong to several sequences;
/// each token goes at its sequence's next position (tokens of one sequence in
/// order), through the session's active adapters. Logits of the tokens that asked
/// for them are kept until the next decode or generate (`graft_get_logits`). If the
/// KV cache cannot hold the batch, GRAFT_ERR_CAPACITY and nothing changes.
///
/// # Safety
/// Pointers must be NULL or valid for the given lengths.
#[no_mangle]
pub unsafe extern "C" fn graft_decode(
    session: *const graft_session,
    tokens: *const graft_batch_token,
    n: usize,
) -> graft_status {
    guard(|| {
        // SAFETY: live handle or NULL per the contract.
        let s = unsafe { session_ref(session) }?;
        // SAFETY: `n` readable entries per the contract.
        let toks = unsafe { slice(tokens, n, "tokens") }?;
        if toks.is_empty() {
            return Err(Error::invalid("empty batch"));
        }
        let m = &s.model;
        let n_vocab = m.model.config.n_vocab;
        let mut guard = s.lock()?;
        let SessionInner {
            cache,
            scratch,
            adapters,
            logits,
        } = &mut *guard;
        let mut next: HashMap<u32, usize> = HashMap::new();
        let mut batch = Vec::with_capacity(toks.len());
        for (i, t) in toks.iter().enumerate() {
            if t.token as usize >= n_vocab {
                return Err(Error::invalid(format!(
                    "tokens[{i}]: token {} is outside the vocabulary (size {n_vocab})",
                    t.token
                )));
            }
            let pos = next.entry(t.seq).or_insert_with(|| cache.seq_len(t.seq));
            batch.push(BatchToken {
                token: t.token,
                pos: *pos,
                seq: t.seq,
                logits: t.logits,
            });
            *pos += 1;
        }
        // Check the whole batch fits before reserving anything, so a refused batch
        // leaves the cache as it was.
        let needed: usize = next
            .iter()
            .map(|(&seq, &len)| {
                len.div_ceil(cache.block_size())
                    .saturating_sub(cache.seq_len(seq).div_ceil(cache.block_size()))
            })
            .sum();
        if needed > cache.free_blocks() {
            return Err(Error::new(
                GRAFT_ERR_CAPACITY,
                format!(
                    "KV cache full: the batch needs {needed} more blocks of {} tokens, {} free",
                    cache.block_size(),
                    cache.free_blocks()
                ),
            ));
        }
        *logits = Logits::default();
        let delta = adapters
            .as_ref()
            .map(|a| a as &dyn graft_adapters::LinearDelta);
        let out = m.run(|| {
            let d = delta.map(|d| BatchDeltas::uniform(d, batch.len()));
            m.model.forward_adapted(&batch, cache, scratch, d.as_ref())
        })?;
        *logits = out;
        Ok(())
    })
}

/// Points `*out` at the logits (`*n_vocab` floats) of batch index `i` of the last
/// `graft_decode` on this session. The memory belongs to the session and stays valid
/// until the next decode, generate or free on it. GRAFT_ERR_NOT_FOUND if that token
/// did not ask for logits or `i` is past the batch.
///
/// # Safety
/// Pointers must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn graft_get_logits(
    session: *const graft_session,
    i: usize,
    out: *mut *const f32,
    n_vocab: *mut usize,
) -> graft_status {
    guard(|| {
        // SAFETY: live handle or NULL per the contract.
        let s = unsafe { session_ref(session) }?;
        non_null(out, "out")?;
        non_null(n_vocab, "n_vocab")?;
        let inner = s.lock()?;
        let Some(row) = inner.logits.for_batch_index(i) else {
            return Err(Error::new(
                GRAFT_ERR_NOT_FOUND,
                format!("no logits for batch index {i} (the token did not ask for them, or there is no such index)"),
            ));
        };
        // SAFETY: both non-NULL (checked) and writable per the contract. The row
        // lives in the session, which the contract keeps alive and unchanged until
        // the next decode/generate/free.
        unsafe {
            out.write(row.as_ptr());
            n_vocab.write(row.len());
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------
// Training
// ---------------------------------------------------------------------------------

// Training methods for `graft_train_params.method` (plain integers, not a C enum:
// an out-of-range enum read from C would be undefined behaviour in Rust).
/// Low-rank adapters on the target projections (writes a GGUF LoRA or a PEFT dir).
pub const GRAFT_TRAIN_LORA: u32 = 0;
/// SaRA: the smallest base weights train in place as a sparse delta (.safetensors).
pub const GRAFT_TRAIN_SARA: u32 = 1;
/// STABLE-RPS: adapter weights drawn from hashed shared pools (.rps).
pub const GRAFT_TRAIN_RPS: u32 = 2;
/// Every tensor of the model (writes a GGUF model).
pub const GRAFT_TRAIN_FULL: u32 = 3;

/// RPS gradient scaler for `graft_train_params.rps_scaler`: A^2 / c (default).
pub const GRAFT_RPS_SCALER_V1: u32 = 0;
/// RPS gradient scaler: the sum of squared lambdas.
pub const GRAFT_RPS_SCALER_V5: u32 = 1;
/// RPS gradient scaler: none.
pub const GRAFT_RPS_SCALER_NONE: u32 = 2;

/// Options for `graft_train`; fill with `graft_train_params_default` first, then set
/// `data_path`, `out_path` and what you want to change. Strings are NUL-terminated
/// UTF-8 and only read during the call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct graft_train_params {
    /// GRAFT_TRAIN_*.
    pub method: u32,
    /// Training data: .jsonl with {"prompt", "completion"} (or {"text"}) per line, or
    /// any other file as plain text.
    pub data_path: *const c_char,
    /// Where the result goes: a file, or a directory for format "peft".
    pub out_path: *const c_char,
    /// "gguf", "peft", "sara" or "rps"; NULL = the method's own format.
    pub format: *const c_char,
    /// Projections to adapt: "all", "attn", "mlp" or a list like "q,v"; NULL = "all".
    pub targets: *const c_char,
    /// LoRA (and RPS-LoRA) rank and alpha.
    pub rank: usize,
    pub alpha: f32,
    /// rsLoRA scaling alpha / sqrt(rank).
    pub rslora: bool,
    /// Optimizer steps.
    pub steps: usize,
    /// Peak learning rate; <= 0 = the method's default.
    pub lr: f32,
    /// Examples per micro-batch, and micro-batches per step.
    pub batch: usize,
    pub accum: usize,
    pub warmup: usize,
    /// Gradient-norm clipping (0 = off).
    pub clip: f32,
    pub weight_decay: f32,
    /// Seeds the initialisation, the train/eval split and the batch order.
    pub seed: u64,
    /// Longest example in tokens.
    pub max_len: usize,
    /// Fraction of JSONL records held out for evaluation.
    pub eval_frac: f64,
    /// Held-out records used for exact match (0 = skip that evaluation).
    pub eval_max: usize,
    /// Recompute activations in the backward pass (less memory, more time).
    pub recompute: bool,
    /// SaRA: magnitude threshold, nuclear-norm weight, progressive re-selection.
    pub sara_theta: f32,
    pub sara_lambda_rank: f32,
    pub sara_progressive: bool,
    /// RPS: dense deltas from one pool instead of LoRA factors from two.
    pub rps_delta: bool,
    /// RPS: pool slots / virtual parameters, in (0, 1]; used when `rps_budget` is 0.
    pub rps_rho: f64,
    /// RPS: pool slots in all (0 = use `rps_rho`).
    pub rps_budget: u64,
    /// GRAFT_RPS_SCALER_*.
    pub rps_scaler: u32,
    /// RPS: seed of the hash maps (stored in the file).
    pub rps_seed: u64,
    /// Write a checkpoint here every `checkpoint_every` steps, at the end and on
    /// cancel; NULL = none.
    pub checkpoint_path: *const c_char,
    pub checkpoint_every: usize,
    /// Resume from this checkpoint (same data and options); NULL = start fresh.
    pub resume_path: *const c_char,
}

/// What `graft_train` reports after each step.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct graft_train_progress {
    /// Steps done (1-based) and asked for.
    pub step: usize,
    pub steps: usize,
    /// Mean loss per target token of this step.
    pub loss: f64,
    pub lr: f32,
    pub grad_norm: f32,
    /// Training tokens per second so far.
    pub tokens_per_s: f64,
}

/// Called after every training step, on the thread that called `graft_train`.
/// Return false to cancel: training stops after this step, the checkpoint (if one
/// was asked for) is written, the result is not, and `graft_train` returns
/// GRAFT_ERR_CANCELLED. To cancel from another thread, set a flag there and return
/// false here when it is set. Must not unwind through graft.
pub type graft_train_callback = Option<
    unsafe extern "C" fn(progress: *const graft_train_progress, user_data: *mut c_void) -> bool,
>;

/// What `graft_train` did.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct graft_train_report {
    /// Steps done (also filled when cancelled).
    pub steps: usize,
    pub trainable_params: usize,
    /// Loss of the last step, and mean loss on the held-out examples.
    pub train_loss: f64,
    pub eval_loss: f64,
    /// Held-out exact match of greedy completions in [0, 1], or -1 when not measured.
    pub eval_exact_match: f64,
    pub eval_records: usize,
    pub train_seconds: f64,
    pub tokens_per_s: f64,
    /// Bytes written to `out_path`.
    pub out_bytes: u64,
}

/// Defaults of `graft train` for `method`: rank 8, alpha 16, 200 steps, batch 8, ...
#[no_mangle]
pub extern "C" fn graft_train_params_default(method: u32) -> graft_train_params {
    let d = JobSpec::default();
    graft_train_params {
        method,
        data_path: std::ptr::null(),
        out_path: std::ptr::null(),
        format: std::ptr::null(),
        targets: std::ptr::null(),
        rank: d.rank,
        alpha: d.alpha,
        rslora: d.rslora,
        steps: d.steps,
        lr: 0.0,
        batch: d.batch,
        accum: d.accum,
        warmup: d.warmup,
        clip: d.clip,
        weight_decay: d.weight_decay,
        seed: d.seed,
        max_len: d.max_len,
        eval_frac: d.eval_frac,
        eval_max: d.eval_max,
        recompute: d.recompute,
        sara_theta: d.theta,
        sara_lambda_rank: d.lambda_rank,
        sara_progressive: d.progressive,
        rps_delta: false,
        rps_rho: d.rho,
        rps_budget: 0,
        rps_scaler: GRAFT_RPS_SCALER_V1,
        rps_seed: d.rps_seed,
        checkpoint_path: std::ptr::null(),
        checkpoint_every: d.checkpoint_every,
        resume_path: std::ptr::null(),
    }
}

/// # Safety
/// String pointers in `p` must be NULL or NUL-terminated.
unsafe fn train_spec(p: &graft_train_params) -> Result<JobSpec> {
    use graft_adapters::rps::Scaler;
    use graft_adapters::train::job::{MethodKind, OutputFormat, RpsMode, TrainData};
    // SAFETY (all c_str calls below): NULL or NUL-terminated per the contract.
    let opt_str = |ptr: *const c_char, what: &str| -> Result<Option<String>> {
        if ptr.is_null() {
            Ok(None)
        } else {
            Ok(Some(unsafe { c_str(ptr, what) }?.to_owned()))
        }
    };
    let data = unsafe { c_str(p.data_path, "params.data_path") }?;
    let out = unsafe { c_str(p.out_path, "params.out_path") }?;
    let format = match opt_str(p.format, "params.format")? {
        None => None,
        Some(f) => Some(OutputFormat::from_name(&f).ok_or_else(|| {
            Error::invalid(format!(
                "params.format {f:?}: expected \"gguf\", \"peft\", \"sara\" or \"rps\""
            ))
        })?),
    };
    let scaler = match p.rps_scaler {
        GRAFT_RPS_SCALER_V1 => Scaler::V1,
        GRAFT_RPS_SCALER_V5 => Scaler::V5,
        GRAFT_RPS_SCALER_NONE => Scaler::None,
        other => {
            return Err(Error::invalid(format!(
                "params.rps_scaler {other}: expected GRAFT_RPS_SCALER_V1, _V5 or _NONE"
            )))
        }
    };
    let method = match p.method {
        GRAFT_TRAIN_LORA => MethodKind::Lora,
        GRAFT_TRAIN_SARA => MethodKind::Sara,
        GRAFT_TRAIN_RPS => MethodKind::Rps,
        GRAFT_TRAIN_FULL => MethodKind::Full,
        other => {
            return Err(Error::invalid(format!(
                "params.method {other}: expected GRAFT_TRAIN_LORA, _SARA, _RPS or _FULL"
            )))
        }
    };
    let d = JobSpec::default();
    Ok(JobSpec {
        method,
        data: TrainData::File(PathBuf::from(data)),
        out: PathBuf::from(out),
        format,
        rank: p.rank,
        alpha: p.alpha,
        rslora: p.rslora,
        targets: opt_str(p.targets, "params.targets")?.unwrap_or(d.targets),
        steps: p.steps,
        lr: (p.lr > 0.0).then_some(p.lr),
        theta: p.sara_theta,
        lambda_rank: p.sara_lambda_rank,
        progressive: p.sara_progressive,
        rps_mode: if p.rps_delta {
            RpsMode::Delta
        } else {
            RpsMode::Lora
        },
        rho: p.rps_rho,
        budget: (p.rps_budget > 0).then_some(p.rps_budget),
        scaler,
        rps_seed: p.rps_seed,
        batch: p.batch,
        accum: p.accum,
        warmup: p.warmup,
        clip: p.clip,
        weight_decay: p.weight_decay,
        seed: p.seed,
        max_len: p.max_len,
        eval_frac: p.eval_frac,
        eval_every: 0,
        eval_max: p.eval_max,
        retention_data: None,
        recompute: p.recompute,
        checkpoint: opt_str(p.checkpoint_path, "params.checkpoint_path")?.map(PathBuf::from),
        checkpoint_every: p.checkpoint_every,
        resume: opt_str(p.resume_path, "params.resume_path")?.map(PathBuf::from),
    })
}

/// Trains on the model's base weights as loaded (quantized or float) and writes the
/// result to `params->out_path`, which `graft_adapter_load` (or, for
/// GRAFT_TRAIN_FULL, `graft_model_load`) reads. The base model is not changed and
/// stays usable from other threads meanwhile. `callback` (may be NULL) sees every
/// step and can cancel; `*report` (may be NULL) is filled on success and, with the
/// steps done, on cancel. Returns GRAFT_ERR_IO for unreadable files,
/// GRAFT_ERR_FORMAT for bad training data (the message names file:line),
/// GRAFT_ERR_INVALID_ARGUMENT for options that do not fit the method or model,
/// GRAFT_ERR_CANCELLED when the callback stopped it.
///
/// # Safety
/// Pointers must be NULL or valid; strings in `params` NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn graft_train(
    model: *const graft_model,
    params: *const graft_train_params,
    callback: graft_train_callback,
    user_data: *mut c_void,
    report: *mut graft_train_report,
) -> graft_status {
    guard(|| {
        // SAFETY: live handle or NULL per the contract.
        let m = unsafe { model_ref(model) }?;
        non_null(params, "params")?;
        // SAFETY: non-NULL and readable per the contract.
        let p = unsafe { params.read() };
        // SAFETY: the strings in `p` are NULL or NUL-terminated per the contract.
        let spec = unsafe { train_spec(&p) }?;
        let mut on_progress = |pr: &Progress| -> Control {
            let Progress::Step {
                stats,
                steps,
                tokens_per_s,
            } = *pr
            else {
                return Control::Continue;
            };
            let Some(cb) = callback else {
                return Control::Continue;
            };
            let c = graft_train_progress {
                step: stats.step,
                steps,
                loss: stats.loss,
                lr: stats.lr,
                grad_norm: stats.grad_norm,
                tokens_per_s,
            };
            // SAFETY: a C function pointer given by the caller; `c` outlives the call.
            if unsafe { cb(&c, user_data) } {
                Control::Continue
            } else {
                Control::Cancel
            }
        };
        let r = match train_on_caller_thread(m, &spec, &mut on_progress) {
            Ok(r) => r,
            Err(e) => {
                if let TrainError::Cancelled { step } = e {
                    // SAFETY: NULL or writable per the contract.
                    unsafe {
                        write_opt(
                            report,
                            graft_train_report {
                                steps: step,
                                train_loss: f64::NAN,
                                eval_loss: f64::NAN,
                                eval_exact_match: -1.0,
                                ..Default::default()
                            },
                        )
                    };
                }
                return Err(e.into());
            }
        };
        // SAFETY: NULL or writable per the contract.
        unsafe {
            write_opt(
                report,
                graft_train_report {
                    steps: r.steps,
                    trainable_params: r.trainable_params,
                    train_loss: r.train_loss,
                    eval_loss: r.eval_loss,
                    eval_exact_match: r.eval_exact_match.unwrap_or(-1.0),
                    eval_records: r.eval_records,
                    train_seconds: r.train_seconds,
                    tokens_per_s: r.tokens_per_s,
                    out_bytes: r.out_bytes,
                },
            )
        };
        Ok(())
    })
}

/// Runs the job in the model's thread pool while progress comes back to the caller's
/// thread, so the C callback always runs where `graft_train` was called (as the
/// header promises) whatever pool does the work.
fn train_on_caller_thread(
    m: &Arc<ModelInner>,
    spec: &JobSpec,
    on_progress: &mut dyn FnMut(&Progress) -> Control,
) -> std::result::Result<JobReport, TrainError> {
    use std::sync::mpsc;
    let (progress_tx, progress_rx) = mpsc::channel::<Progress>();
    let (answer_tx, answer_rx) = mpsc::channel::<Control>();
    std::thread::scope(|scope| {
        let worker = scope.spawn(move || {
            m.run(move || {
                job::run(&m.model, &m.tokenizer, spec, &mut |p| {
                    if progress_tx.send(*p).is_err() {
                        return Control::Cancel;
                    }
                    answer_rx.recv().unwrap_or(Control::Cancel)
                })
            })
        });
        for p in progress_rx {
            // A send fails only when the worker is gone; it then ends the loop too.
            let _ = answer_tx.send(on_progress(&p));
        }
        // A panic in the worker continues on this thread, where the entry point's
        // guard turns it into GRAFT_ERR_INTERNAL.
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
