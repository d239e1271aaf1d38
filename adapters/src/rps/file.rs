//! `.rps` files: the pools in a safetensors container, the layout in its metadata
//! (see `adapters/RPS_FORMAT.md`). Indices are regenerated from the seed, never
//! stored; the stored hash constants are checked against the regenerated ones.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use graft_runtime::model::{Model, ModelConfig, Proj};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use super::fold::{FoldConstants, MAPPER_NAME};
use super::layout::{pool_seed, Role, RpsLayout, RpsMode, Scaler, VirtualTensor};
use crate::delta::Adapter;
use crate::error::{AdapterError, Result};
use crate::sara::{decode_f32, shown, st_message};
use crate::st_write::{self, StTensor};

/// `__metadata__["format"]` of an RPS file.
pub const FORMAT: &str = "graft-rps";
/// `__metadata__["version"]` this module reads and writes.
pub const VERSION: &str = "1";
/// The file extension [`crate::load_adapter`] recognises.
pub const EXTENSION: &str = "rps";

/// One pool in the `pools` metadata JSON.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolEntry {
    name: String,
    m: u64,
    n: u64,
    seed: u64,
    a: u64,
    b: u64,
    c: u64,
    key_r: u64,
    key_k: u64,
}

/// One virtual tensor in the `tensors` metadata JSON.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorEntry {
    name: String,
    layer: usize,
    proj: String,
    role: String,
    shape: [usize; 2],
    offset: u64,
    lambda: f32,
}

/// The bytes of an `.rps` file holding `layout` and its `pools` (`name` stands for the
/// file in errors). Pool values must be finite.
pub fn to_bytes<P: AsRef<[f32]>>(layout: &RpsLayout, pools: &[P], name: &str) -> Result<Vec<u8>> {
    layout.check_pools(pools, name)?;
    let mut info: BTreeMap<String, String> = BTreeMap::new();
    let mut put = |k: &str, v: String| info.insert(k.to_owned(), v);
    put("format", FORMAT.to_owned());
    put("version", VERSION.to_owned());
    put("architecture", layout.arch().name().to_owned());
    put("mapper", MAPPER_NAME.to_owned());
    put("seed", layout.seed().to_string());
    put("mode", layout.mode().name().to_owned());
    if let RpsMode::Lora { rank, alpha } = layout.mode() {
        put("rank", rank.to_string());
        put("alpha", alpha.to_string());
    }
    put("scaler", layout.scaler().name().to_owned());
    let pool_entries: Vec<PoolEntry> = layout
        .pools()
        .iter()
        .map(|p| {
            let FoldConstants {
                a,
                b,
                c,
                key_r,
                key_k,
            } = p.fold().constants();
            PoolEntry {
                name: p.name().to_owned(),
                m: p.m(),
                n: p.n(),
                seed: p.fold().seed(),
                a,
                b,
                c,
                key_r,
                key_k,
            }
        })
        .collect();
    let tensor_entries: Vec<TensorEntry> = layout
        .tensors()
        .iter()
        .map(|t| TensorEntry {
            name: t.name(),
            layer: t.layer,
            proj: t.proj.gguf_stem().to_owned(),
            role: t.role.name().to_owned(),
            shape: [t.rows, t.cols],
            offset: t.offset,
            lambda: t.lambda,
        })
        .collect();
    let json = |r: serde_json::Result<String>| {
        r.map_err(|e| AdapterError::invalid(name, format!("serializing the layout: {e}")))
    };
    put("pools", json(serde_json::to_string(&pool_entries))?);
    put("tensors", json(serde_json::to_string(&tensor_entries))?);

    let mut tensors: BTreeMap<String, StTensor> = BTreeMap::new();
    for (p, z) in layout.pools().iter().zip(pools) {
        let z = z.as_ref();
        if let Some(k) = z.iter().position(|v| !v.is_finite()) {
            return Err(AdapterError::tensor(
                name,
                p.name(),
                format!("value {k} is {}, expected a finite number", z[k]),
            ));
        }
        tensors.insert(p.name().to_owned(), StTensor::f32(vec![z.len()], z));
    }
    st_write::to_bytes(&info, &tensors, name)
}

/// Writes `layout` and `pools` as an `.rps` file at `path` (through a temporary file
/// renamed into place).
pub fn save<P: AsRef<[f32]>>(path: &Path, layout: &RpsLayout, pools: &[P]) -> Result<()> {
    let bytes = to_bytes(layout, pools, &path.display().to_string())?;
    st_write::write_atomic(path, &bytes)
}

/// Loads an `.rps` file for `model` and expands it into an adapter.
pub fn load(path: &Path, model: &Model) -> Result<Adapter> {
    let (layout, pools) = read(path, &model.config)?;
    layout.to_adapter(&model.config, &pools, path.to_path_buf())
}

/// Reads an `.rps` file's layout and pools (to resume training or inspect it),
/// checked against `config`.
pub fn read(path: &Path, config: &ModelConfig) -> Result<(RpsLayout, Vec<Vec<f32>>)> {
    let file = path.display().to_string();
    let f = std::fs::File::open(path).map_err(|source| AdapterError::Io {
        file: file.clone(),
        source,
    })?;
    // SAFETY: read-only map, dropped before returning; every value is copied out.
    // Files are treated as immutable while read (as for SaRA files).
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|source| AdapterError::Io {
        file: file.clone(),
        source,
    })?;
    from_bytes(&map, &file, config)
}

/// [`read`] on an in-memory file (`name` stands for the file in errors).
pub fn from_bytes(
    bytes: &[u8],
    name: &str,
    config: &ModelConfig,
) -> Result<(RpsLayout, Vec<Vec<f32>>)> {
    parse(bytes, name, config)
}

/// [`load`] on an in-memory file.
pub fn adapter_from_bytes(bytes: &[u8], name: &str, config: &ModelConfig) -> Result<Adapter> {
    let (layout, pools) = parse(bytes, name, config)?;
    layout.to_adapter(config, &pools, PathBuf::from(name))
}

fn parse(bytes: &[u8], file: &str, config: &ModelConfig) -> Result<(RpsLayout, Vec<Vec<f32>>)> {
    let bad = |w: String| AdapterError::invalid(file, w);
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {}", st_message(&e))))?;
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {}", st_message(&e))))?;
    let empty = HashMap::new();
    let md = header.metadata().as_ref().unwrap_or(&empty);
    let get = |key: &str| md.get(key).map(String::as_str);
    let expect = |key: &str, want: &str| -> Result<()> {
        match get(key) {
            Some(v) if v == want => Ok(()),
            found => Err(bad(format!(
                "metadata {key} = {}, expected {want:?}",
                shown(found)
            ))),
        }
    };
    expect("format", FORMAT)?;
    expect("version", VERSION)?;
    let arch = config.arch.name();
    if get("architecture") != Some(arch) {
        return Err(bad(format!(
            "metadata architecture = {}, expected {arch:?} (the base model's)",
            shown(get("architecture"))
        )));
    }
    expect("mapper", MAPPER_NAME)?;
    let required = |key: &str, what: &str| -> Result<&str> {
        get(key).ok_or_else(|| bad(format!("metadata {key} is missing, expected {what}")))
    };
    let seed_text = required("seed", "a decimal u64")?;
    let seed: u64 = seed_text.parse().map_err(|_| {
        bad(format!(
            "metadata seed = {seed_text:?}, expected a decimal u64"
        ))
    })?;
    let mode = match required("mode", "\"lora\" or \"delta\"")? {
        "lora" => {
            let r = required("rank", "a positive integer")?;
            let rank: usize = r.parse().ok().filter(|&r| r > 0).ok_or_else(|| {
                bad(format!(
                    "metadata rank = {r:?}, expected a positive integer"
                ))
            })?;
            let a = required("alpha", "a finite number")?;
            let alpha: f32 = a
                .parse()
                .ok()
                .filter(|v: &f32| v.is_finite())
                .ok_or_else(|| bad(format!("metadata alpha = {a:?}, expected a finite number")))?;
            RpsMode::Lora { rank, alpha }
        }
        "delta" => RpsMode::Delta,
        other => {
            return Err(bad(format!(
                "metadata mode = {other:?}, expected \"lora\" or \"delta\""
            )))
        }
    };
    let s = required("scaler", "\"v1\", \"v5\" or \"none\"")?;
    let scaler = Scaler::from_name(s).ok_or_else(|| {
        bad(format!(
            "metadata scaler = {s:?}, expected \"v1\", \"v5\" or \"none\""
        ))
    })?;

    // Pools: names in order, seeds and constants regenerated from the file's seed.
    let text = required("pools", "a JSON array of pools")?;
    let pools: Vec<PoolEntry> = serde_json::from_str(text)
        .map_err(|e| bad(format!("metadata pools is not a valid pool list: {e}")))?;
    let names = mode.pool_names();
    if pools.len() != names.len() {
        return Err(bad(format!(
            "metadata pools lists {} pools, expected {} ({}) for mode {}",
            pools.len(),
            names.len(),
            names.join(", "),
            mode.name()
        )));
    }
    for (q, (p, &want)) in pools.iter().zip(names).enumerate() {
        if p.name != want {
            return Err(bad(format!(
                "metadata pools[{q}].name = {:?}, expected {want:?}",
                p.name
            )));
        }
        let ps = pool_seed(seed, q);
        let c = FoldConstants::from_seed(ps);
        for (field, found, expected) in [
            ("seed", p.seed, ps),
            ("a", p.a, c.a),
            ("b", p.b, c.b),
            ("c", p.c, c.c),
            ("key_r", p.key_r, c.key_r),
            ("key_k", p.key_k, c.key_k),
        ] {
            if found != expected {
                return Err(bad(format!(
                    "metadata pools[{q}] ({want}).{field} = {found}, expected {expected} \
                     (regenerated from seed {seed})"
                )));
            }
        }
    }

    // Tensors of the file: exactly the pools, F32 [m], finite.
    let mut tnames: Vec<&String> = st.names();
    tnames.sort();
    for t in tnames {
        if !names.contains(&t.as_str()) {
            return Err(AdapterError::tensor(
                file,
                t,
                format!("unexpected tensor, expected only {}", names.join(", ")),
            ));
        }
    }
    let mut values = Vec::with_capacity(pools.len());
    for p in &pools {
        let v = st.tensor(&p.name).map_err(|_| {
            AdapterError::tensor(
                file,
                &p.name,
                format!("is missing, expected an F32 [{}] pool", p.m),
            )
        })?;
        if v.dtype() != Dtype::F32 {
            return Err(AdapterError::tensor(
                file,
                &p.name,
                format!("dtype {:?}, expected F32", v.dtype()),
            ));
        }
        let len_ok = matches!(v.shape(), [len] if *len as u64 == p.m);
        if !len_ok {
            return Err(AdapterError::tensor(
                file,
                &p.name,
                format!(
                    "shape {:?}, expected [{}] (m of metadata pools)",
                    v.shape(),
                    p.m
                ),
            ));
        }
        let z = decode_f32(v.data());
        if let Some(k) = z.iter().position(|x| !x.is_finite()) {
            return Err(AdapterError::tensor(
                file,
                &p.name,
                format!("value {k} is {}, expected a finite number", z[k]),
            ));
        }
        values.push(z);
    }

    // Virtual tensors.
    let text = required("tensors", "a JSON array of virtual tensors")?;
    let entries: Vec<TensorEntry> = serde_json::from_str(text)
        .map_err(|e| bad(format!("metadata tensors is not a valid tensor list: {e}")))?;
    let mut tensors = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let proj = Proj::from_gguf_stem(&e.proj).ok_or_else(|| {
            bad(format!(
                "metadata tensors[{i}].proj = {:?}, expected one of attn_q, attn_k, attn_v, \
                 attn_output, ffn_gate, ffn_up, ffn_down",
                e.proj
            ))
        })?;
        let role = Role::from_name(&e.role).ok_or_else(|| {
            bad(format!(
                "metadata tensors[{i}].role = {:?}, expected \"a\", \"b\" or \"delta\"",
                e.role
            ))
        })?;
        let t = VirtualTensor {
            layer: e.layer,
            proj,
            role,
            rows: e.shape[0],
            cols: e.shape[1],
            offset: e.offset,
            lambda: e.lambda,
        };
        if e.name != t.name() {
            return Err(bad(format!(
                "metadata tensors[{i}].name = {:?}, expected {:?} (from its layer, proj and role)",
                e.name,
                t.name()
            )));
        }
        tensors.push(t);
    }
    let slots: Vec<u64> = pools.iter().map(|p| p.m).collect();
    let layout = RpsLayout::checked(config, mode, seed, scaler, &slots, tensors)
        .map_err(|w| bad(format!("metadata tensors: {w}")))?;
    for (q, (p, lp)) in pools.iter().zip(layout.pools()).enumerate() {
        if p.n != lp.n() {
            return Err(bad(format!(
                "metadata pools[{q}] ({}).n = {}, expected {} (the sum of its tensors' sizes)",
                p.name,
                p.n,
                lp.n()
            )));
        }
    }
    Ok((layout, values))
}
