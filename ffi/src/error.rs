//! Status codes, the thread-local last-error message, and the guard every entry
//! point runs in (no panic crosses the C boundary).

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use graft_adapters::train::TrainError;
use graft_adapters::{AdapterError, RegistryError};
use graft_runtime::gguf::{GgufError, GgufErrorKind};
use graft_runtime::kv_cache::KvError;
use graft_runtime::model::ModelError;
use graft_runtime::sampling::SamplingError;
use graft_runtime::tokenizer::TokenizerError;

/// Result of every fallible call. On anything but `GRAFT_OK`, `graft_last_error()`
/// describes what went wrong.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum graft_status {
    GRAFT_OK = 0,
    /// A NULL pointer, an out-of-range value, invalid UTF-8, a bad token id.
    GRAFT_ERR_INVALID_ARGUMENT = 1,
    /// A file could not be opened or read (e.g. it does not exist).
    GRAFT_ERR_IO = 2,
    /// A file was read but is not a valid model or adapter (truncated, corrupted).
    GRAFT_ERR_FORMAT = 3,
    /// No adapter of that name is loaded, or no logits for that batch index.
    GRAFT_ERR_NOT_FOUND = 4,
    /// Generation was stopped by the callback or by `graft_session_cancel`.
    GRAFT_ERR_CANCELLED = 5,
    /// The KV cache or the adapter registry has no room.
    GRAFT_ERR_CAPACITY = 6,
    /// A feature or option this build does not offer (e.g. a provider other than "cpu").
    GRAFT_ERR_UNSUPPORTED = 7,
    /// An adapter that does not fit the model (another architecture or shape).
    GRAFT_ERR_INCOMPATIBLE = 8,
    /// A caller buffer is too small; the required size was still written.
    GRAFT_ERR_BUFFER_TOO_SMALL = 9,
    /// A compare-and-set adapter replace lost against a concurrent replace.
    GRAFT_ERR_CONFLICT = 10,
    /// The session is in use by another call (sessions are not for concurrent use).
    GRAFT_ERR_BUSY = 11,
    /// A bug in graft (a caught panic); the handle involved should be freed.
    GRAFT_ERR_INTERNAL = 12,
}

/// An error on its way to the C caller: a status and a message.
#[derive(Debug)]
pub struct Error {
    pub status: graft_status,
    pub msg: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(status: graft_status, msg: impl Into<String>) -> Error {
        Error {
            status,
            msg: msg.into(),
        }
    }

    pub fn invalid(msg: impl Into<String>) -> Error {
        Error::new(graft_status::GRAFT_ERR_INVALID_ARGUMENT, msg)
    }
}

fn gguf_status(e: &GgufError) -> graft_status {
    match e.kind() {
        GgufErrorKind::Io { .. } => graft_status::GRAFT_ERR_IO,
        _ => graft_status::GRAFT_ERR_FORMAT,
    }
}

fn model_status(e: &ModelError) -> graft_status {
    match e {
        ModelError::Gguf(g) => gguf_status(g),
        ModelError::Unsupported { .. } => graft_status::GRAFT_ERR_UNSUPPORTED,
        ModelError::Forward(_) => graft_status::GRAFT_ERR_INVALID_ARGUMENT,
        _ => graft_status::GRAFT_ERR_FORMAT,
    }
}

impl From<ModelError> for Error {
    fn from(e: ModelError) -> Error {
        Error::new(model_status(&e), e.to_string())
    }
}

impl From<TokenizerError> for Error {
    fn from(e: TokenizerError) -> Error {
        let status = match &e {
            TokenizerError::Gguf(g) => gguf_status(g),
            _ => graft_status::GRAFT_ERR_FORMAT,
        };
        Error::new(status, format!("tokenizer: {e}"))
    }
}

fn adapter_status(e: &AdapterError) -> graft_status {
    use graft_status::*;
    match e {
        AdapterError::Io { .. } => GRAFT_ERR_IO,
        AdapterError::Gguf(g) => gguf_status(g),
        AdapterError::Model(m) => model_status(m),
        // Tensors named or shaped for another model: the adapter is well-formed
        // but was trained for a different base.
        AdapterError::Shape { .. } | AdapterError::Tensor { .. } => GRAFT_ERR_INCOMPATIBLE,
        AdapterError::Registry(r) => match r {
            RegistryError::NotLoaded { .. } => GRAFT_ERR_NOT_FOUND,
            RegistryError::GenerationMismatch { .. } => GRAFT_ERR_CONFLICT,
            RegistryError::TooLarge { .. } | RegistryError::NoCapacity { .. } => GRAFT_ERR_CAPACITY,
            RegistryError::EmptyName => GRAFT_ERR_INVALID_ARGUMENT,
        },
        _ => GRAFT_ERR_FORMAT,
    }
}

impl From<AdapterError> for Error {
    fn from(e: AdapterError) -> Error {
        Error::new(adapter_status(&e), e.to_string())
    }
}

impl From<TrainError> for Error {
    fn from(e: TrainError) -> Error {
        use graft_status::*;
        let status = match &e {
            TrainError::Io { .. } => GRAFT_ERR_IO,
            TrainError::Data(_) | TrainError::Quant { .. } => GRAFT_ERR_FORMAT,
            TrainError::Config(_) | TrainError::Shape(_) => GRAFT_ERR_INVALID_ARGUMENT,
            TrainError::Cancelled { .. } => GRAFT_ERR_CANCELLED,
            TrainError::Adapter(a) => adapter_status(a),
            TrainError::Model(m) => model_status(m),
        };
        Error::new(status, format!("train: {e}"))
    }
}

impl From<KvError> for Error {
    fn from(e: KvError) -> Error {
        let status = match e {
            KvError::OutOfBlocks { .. } => graft_status::GRAFT_ERR_CAPACITY,
            _ => graft_status::GRAFT_ERR_INVALID_ARGUMENT,
        };
        Error::new(status, e.to_string())
    }
}

impl From<SamplingError> for Error {
    fn from(e: SamplingError) -> Error {
        Error::invalid(format!("sampling: {e}"))
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    // Interior NULs would cut the C string short; they cannot come from valid text
    // anyway, so replace them.
    let bytes: Vec<u8> = msg.bytes().map(|b| if b == 0 { b'?' } else { b }).collect();
    let c = CString::new(bytes).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// A pointer to this thread's last error message (empty when the last call
/// succeeded). Valid until the next graft call on this thread.
pub fn last_error_ptr() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Runs one entry point: clears the last error, catches panics, and turns the
/// outcome into a status (recording the message on failure).
pub fn guard(f: impl FnOnce() -> Result<()>) -> graft_status {
    set_last_error("");
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => graft_status::GRAFT_OK,
        Ok(Err(e)) => {
            let msg = if e.msg.is_empty() {
                format!("{:?}", e.status)
            } else {
                e.msg
            };
            set_last_error(&msg);
            e.status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            set_last_error(&format!("internal error (caught panic): {what}"));
            graft_status::GRAFT_ERR_INTERNAL
        }
    }
}

/// Runs an entry point that returns no status (free functions, getters): panics are
/// caught and `fallback` returned.
pub fn guard_value<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}
