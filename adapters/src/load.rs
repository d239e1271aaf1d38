//! Choosing an adapter loader from a path, and the CLI's `PATH[:SCALE]` argument.

use std::path::{Path, PathBuf};

use graft_runtime::gguf::has_gguf_magic;
use graft_runtime::model::Model;

use crate::delta::Adapter;
use crate::error::{AdapterError, Result};
use crate::{gguf_lora, peft, rps, sara};

/// Loads the adapter at `path` for `model`: a directory is a PEFT checkpoint, a file
/// starting with the GGUF magic a llama.cpp GGUF LoRA, a `.safetensors` file a SaRA
/// sparse delta, a `.rps` file STABLE-RPS pools (expanded into LoRA or dense deltas).
pub fn load_adapter(path: &Path, model: &Model) -> Result<Adapter> {
    let name = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| AdapterError::Io {
        file: name.clone(),
        source,
    })?;
    if meta.is_dir() {
        return peft::load(path, model);
    }
    if has_gguf_magic(path) {
        return gguf_lora::load(path, model);
    }
    if path.extension().is_some_and(|e| e == "safetensors") {
        return sara::load(path, model);
    }
    if path.extension().is_some_and(|e| e == rps::file::EXTENSION) {
        return rps::load(path, model);
    }
    Err(AdapterError::invalid(
        name,
        "not an adapter: expected a PEFT directory (adapter_config.json + \
         adapter_model.safetensors), a GGUF LoRA file, a SaRA .safetensors file or an \
         RPS .rps file",
    ))
}

/// Parses `PATH[:SCALE]` (scale 1 when absent). The scale is the text after the last
/// ':' when it parses as a finite number, so paths with ':' work (`C:\a.gguf`,
/// `dir:x/a.gguf:0.5`); when the whole text names an existing file and the part
/// before the ':' does not, the whole text is the path.
pub fn parse_adapter_arg(s: &str) -> Result<(PathBuf, f32)> {
    let bad = |what: &str| AdapterError::invalid(s, what);
    if s.is_empty() {
        return Err(bad("empty adapter argument, expected PATH[:SCALE]"));
    }
    let Some((path, scale)) = s.rsplit_once(':') else {
        return Ok((PathBuf::from(s), 1.0));
    };
    let whole_exists = Path::new(s).exists();
    let Ok(value) = scale.trim().parse::<f32>() else {
        // Not a number: a ':' inside the path (or a typo, which loading reports).
        if scale.is_empty() && !whole_exists {
            return Err(bad("empty scale after ':', expected PATH[:SCALE]"));
        }
        return Ok((PathBuf::from(s), 1.0));
    };
    if whole_exists && !Path::new(path).exists() {
        return Ok((PathBuf::from(s), 1.0));
    }
    if path.is_empty() {
        return Err(bad("empty path before ':', expected PATH[:SCALE]"));
    }
    if !value.is_finite() {
        return Err(bad("scale is not a finite number, expected PATH[:SCALE]"));
    }
    Ok((PathBuf::from(path), value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_args() {
        let p = |s: &str| parse_adapter_arg(s).unwrap();
        assert_eq!(p("a.gguf"), ("a.gguf".into(), 1.0));
        assert_eq!(p("a.gguf:0.5"), ("a.gguf".into(), 0.5));
        assert_eq!(p("a.gguf:-1"), ("a.gguf".into(), -1.0));
        assert_eq!(p("dir:x/a.gguf:2"), ("dir:x/a.gguf".into(), 2.0));
        assert_eq!(p(r"C:\x\a.gguf"), (r"C:\x\a.gguf".into(), 1.0));
        assert_eq!(p(r"C:\x\a.gguf:0.25"), (r"C:\x\a.gguf".into(), 0.25));
        for bad in ["", ":0.5", "a.gguf:", "a.gguf:nan", "a.gguf:inf"] {
            assert!(parse_adapter_arg(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn existing_file_with_numeric_suffix_is_a_path() {
        let dir = std::env::temp_dir().join(format!("graft-arg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("lora:5");
        std::fs::write(&f, b"x").unwrap();
        let s = f.display().to_string();
        assert_eq!(parse_adapter_arg(&s).unwrap(), (f.clone(), 1.0));
        assert_eq!(
            parse_adapter_arg(&format!("{s}:0.5")).unwrap(),
            (f.clone(), 0.5)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
