//! Model listing and the adapter lifecycle: load, replace, unload.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use graft_adapters::{load_adapter as load_file, AdapterError, Generation, RegistryError};
use serde_json::{json, Value};

use crate::api::{json_error, LoadAdapterRequest, UnloadAdapterRequest};
use crate::error::ApiError;
use crate::generate::body_error;
use crate::AppState;

/// Longest adapter name accepted.
const MAX_NAME: usize = 256;

pub(crate) async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    let mut data = vec![json!({
        "id": st.opts.model_id,
        "object": "model",
        "created": st.created,
        "owned_by": "graft",
        "root": st.opts.model_path.display().to_string(),
        "parent": null,
    })];
    let mut adapters = st.registry.list();
    adapters.sort_by(|a, b| a.name.cmp(&b.name));
    for a in adapters {
        data.push(json!({
            "id": &*a.name,
            "object": "model",
            "created": st.created,
            "owned_by": "graft",
            "root": a.source.display().to_string(),
            "parent": st.opts.model_id,
        }));
    }
    Json(json!({"object": "list", "data": data}))
}

pub(crate) async fn lora_adapters(State(st): State<Arc<AppState>>) -> Json<Value> {
    let mut adapters = st.registry.list();
    adapters.sort_by(|a, b| a.name.cmp(&b.name));
    let data: Vec<Value> = adapters
        .iter()
        .enumerate()
        .map(|(i, a)| {
            json!({
                "id": i,
                "name": &*a.name,
                "generation": a.generation.0,
                "bytes": a.bytes,
                "format": format!("{:?}", a.format),
                "path": a.source.display().to_string(),
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

fn loading_disabled() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "adapter_loading_disabled",
        "loading and unloading adapters is disabled: start the server with --allow-adapter-loading",
    )
}

fn check_name(st: &AppState, name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(ApiError::invalid_field(
            "lora_name",
            format!("must be 1 to {MAX_NAME} printable characters"),
        ));
    }
    if name == st.opts.model_id {
        return Err(ApiError::invalid_field(
            "lora_name",
            "is the base model's id",
        ));
    }
    Ok(())
}

fn outside(requested: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "path_outside_root",
        format!("{requested:?} is not inside the adapter root"),
    )
}

/// `requested` (relative to `root`, or absolute) as a canonical path inside `root`:
/// no `..`, no absolute path elsewhere, no symlink leading out (checked on the
/// resolved path, and for a PEFT directory on each of its entries).
fn confine(root: &Path, requested: &str) -> Result<PathBuf, ApiError> {
    if requested.is_empty() || requested.contains('\0') {
        return Err(ApiError::invalid_field("lora_path", "empty or invalid"));
    }
    let p = Path::new(requested);
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(outside(requested));
    }
    let joined = if p.is_absolute() {
        // Refuse before touching the file system: no probing outside the root.
        if !p.starts_with(root) {
            return Err(outside(requested));
        }
        p.to_path_buf()
    } else {
        root.join(p)
    };
    let canon = joined.canonicalize().map_err(|e| {
        ApiError::not_found("adapter_path_not_found", format!("{requested:?}: {e}"))
    })?;
    if !canon.starts_with(root) {
        return Err(outside(requested));
    }
    if canon.is_dir() {
        let entries = std::fs::read_dir(&canon)
            .map_err(|e| ApiError::bad_request("invalid_adapter", format!("{requested:?}: {e}")))?;
        for entry in entries.flatten() {
            let inside = entry
                .path()
                .canonicalize()
                .is_ok_and(|c| c.starts_with(root));
            if !inside {
                return Err(outside(requested));
            }
        }
    }
    Ok(canon)
}

fn adapter_error(e: AdapterError) -> ApiError {
    match e {
        AdapterError::Registry(RegistryError::NotLoaded { name }) => ApiError::not_found(
            "adapter_not_found",
            format!("no adapter named {name:?} is loaded"),
        ),
        AdapterError::Registry(e @ RegistryError::GenerationMismatch { .. }) => {
            ApiError::new(StatusCode::CONFLICT, "generation_mismatch", e.to_string())
        }
        AdapterError::Registry(e @ RegistryError::TooLarge { .. })
        | AdapterError::Registry(e @ RegistryError::NoCapacity { .. }) => {
            ApiError::bad_request("adapter_too_large", e.to_string())
        }
        // Wrong format, wrong architecture, bad shapes: the file does not fit the base.
        other => ApiError::bad_request("invalid_adapter", other.to_string()),
    }
}

pub(crate) async fn load_adapter(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match load(st, body).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn load(st: Arc<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    if !st.opts.allow_adapter_loading {
        return Err(loading_disabled());
    }
    let body = body.map_err(body_error)?;
    let req: LoadAdapterRequest = serde_json::from_slice(&body).map_err(json_error)?;
    check_name(&st, &req.lora_name)?;
    let Some(root) = st.root.clone() else {
        return Err(loading_disabled());
    };
    let path = confine(&root, &req.lora_path)?;
    let Ok(_guard) = st.load_lock.try_lock() else {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "load_in_progress",
            "another adapter is being loaded; retry shortly",
        )
        .with_retry_after(1));
    };
    let exists = st.registry.contains(&req.lora_name);
    if exists && req.expected_generation.is_none() && !req.load_inplace {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "adapter_exists",
            format!(
                "{:?} is already loaded: pass expected_generation (compare-and-set) or load_inplace",
                req.lora_name
            ),
        ));
    }
    // Reading and validating the file is blocking disk work.
    let model = st.model.clone();
    let p = path.clone();
    let adapter = tokio::task::spawn_blocking(move || {
        let a = load_file(&p, &model)?;
        if a.n_layer() != model.config.n_layer {
            return Err(AdapterError::Invalid {
                file: p.display().to_string(),
                what: format!(
                    "adapter built for {} layers, the base has {}",
                    a.n_layer(),
                    model.config.n_layer
                ),
            });
        }
        Ok(a)
    })
    .await
    .map_err(|e| ApiError::internal(format!("adapter loading failed: {e}")))?
    .map_err(adapter_error)?;
    let (generation, status) = match req.expected_generation {
        Some(g) => (
            st.registry
                .replace(&req.lora_name, Generation(g), adapter)
                .map_err(adapter_error)?,
            "replaced",
        ),
        None => (
            st.registry
                .insert(&req.lora_name, adapter)
                .map_err(adapter_error)?,
            if exists { "replaced" } else { "loaded" },
        ),
    };
    tracing::info!(name = req.lora_name, %generation, path = %path.display(), "adapter {status}");
    Ok(json!({
        "lora_name": req.lora_name,
        "generation": generation.0,
        "status": status,
    }))
}

pub(crate) async fn unload_adapter(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = (|| {
        if !st.opts.allow_adapter_loading {
            return Err(loading_disabled());
        }
        let body = body.map_err(body_error)?;
        let req: UnloadAdapterRequest = serde_json::from_slice(&body).map_err(json_error)?;
        st.registry.unload(&req.lora_name).map_err(adapter_error)?;
        tracing::info!(name = req.lora_name, "adapter unloaded");
        Ok(json!({"lora_name": req.lora_name, "status": "unloaded"}))
    })();
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confine_keeps_paths_inside_the_root() {
        let base = std::env::temp_dir().join(format!("graft-confine-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("root");
        std::fs::create_dir_all(root.join("dir")).unwrap();
        std::fs::write(root.join("a.gguf"), b"x").unwrap();
        std::fs::write(base.join("secret"), b"x").unwrap();
        let root = root.canonicalize().unwrap();
        assert_eq!(confine(&root, "a.gguf").unwrap(), root.join("a.gguf"));
        let abs = root.join("a.gguf");
        assert_eq!(confine(&root, abs.to_str().unwrap()).unwrap(), abs);
        for bad in ["../secret", "dir/../../secret", "/etc/passwd", ""] {
            assert!(confine(&root, bad).is_err(), "{bad:?} accepted");
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(base.join("secret"), root.join("link")).unwrap();
            std::os::unix::fs::symlink(base.join("secret"), root.join("dir/inner")).unwrap();
            let e = confine(&root, "link").unwrap_err();
            assert_eq!((e.status.as_u16(), e.code), (403, "path_outside_root"));
            // A directory whose entries lead out is refused as a whole.
            assert_eq!(confine(&root, "dir").unwrap_err().code, "path_outside_root");
        }
        let _ = std::fs::remove_dir_all(&base);
    }
}
