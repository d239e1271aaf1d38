//! Writes the C header of graft-ffi: `graft-gen-header [OUT]` (default
//! `ffi/include/graft.h`, relative to the workspace root).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let ffi_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::env::args_os()
        .nth(1)
        .map_or_else(|| ffi_dir.join("include/graft.h"), PathBuf::from);
    let config = match cbindgen::Config::from_file(ffi_dir.join("cbindgen.toml")) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("graft-gen-header: ffi/cbindgen.toml: {e}");
            return ExitCode::FAILURE;
        }
    };
    let bindings = match cbindgen::Builder::new()
        .with_crate(&ffi_dir)
        .with_config(config)
        .generate()
    {
        Ok(b) => b,
        Err(e) => {
            eprintln!("graft-gen-header: {e}");
            return ExitCode::FAILURE;
        }
    };
    bindings.write_to_file(&out);
    println!("wrote {}", out.display());
    ExitCode::SUCCESS
}
