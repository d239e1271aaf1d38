//! The hook through which weight deltas (LoRA, DoRA, sparse deltas, stacks of them)
//! change a projection's output inside the batched forward pass without touching
//! the base weights.
//!
//! The forward pass computes the base output `y = W x` of every projection for the
//! whole batch once, then hands each group of tokens that share one delta its rows of
//! `x` and `y` (the BGMV/SGMV idea of Punica and S-LoRA, on CPU): a batch may mix
//! sequences on different adapters, and the base matmul is never repeated.

use std::fmt;

/// A linear projection of a transformer layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// Position in [`Proj::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The GGUF tensor name stem (`blk.N.<stem>.weight`).
    pub fn gguf_stem(self) -> &'static str {
        match self {
            Proj::Q => "attn_q",
            Proj::K => "attn_k",
            Proj::V => "attn_v",
            Proj::O => "attn_output",
            Proj::Gate => "ffn_gate",
            Proj::Up => "ffn_up",
            Proj::Down => "ffn_down",
        }
    }

    /// The Hugging Face module name (`model.layers.N.<parent>.<module>`).
    pub fn hf_module(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// The HF parent module (`self_attn` or `mlp`).
    pub fn hf_parent(self) -> &'static str {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            Proj::Gate | Proj::Up | Proj::Down => "mlp",
        }
    }

    pub fn from_gguf_stem(stem: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.gguf_stem() == stem)
    }

    pub fn from_hf_module(module: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.hf_module() == module)
    }

    /// Parses a GGUF weight name `blk.N.<stem>.weight` into (layer, projection).
    pub fn parse_gguf_weight(name: &str) -> Option<(usize, Proj)> {
        let rest = name.strip_prefix("blk.")?;
        let (layer, rest) = rest.split_once('.')?;
        let stem = rest.strip_suffix(".weight")?;
        Some((layer.parse().ok()?, Proj::from_gguf_stem(stem)?))
    }

    /// The GGUF weight name of this projection in `layer`.
    pub fn gguf_weight(self, layer: usize) -> String {
        format!("blk.{layer}.{}.weight", self.gguf_stem())
    }
}

impl fmt::Display for Proj {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.gguf_stem())
    }
}

/// An error a delta reports while being applied.
pub type DeltaError = Box<dyn std::error::Error + Send + Sync>;

/// Something that changes the output of base projections.
pub trait LinearDelta: Send + Sync {
    /// Whether this delta changes projection `proj` of layer `layer`; the forward pass
    /// skips gathering rows for projections no delta touches.
    fn touches(&self, layer: usize, proj: Proj) -> bool;

    /// Whether `apply` at (layer, proj) only adds a term that does not depend on `y`
    /// (LoRA, sparse deltas; not DoRA). The forward pass may then compute that term
    /// on a zeroed buffer while the base matmul runs, and add it afterwards.
    fn is_additive(&self, _layer: usize, _proj: Proj) -> bool {
        false
    }

    /// `x` holds `n` input rows of the projection, `y` the same `n` rows of the base
    /// output `W x` (before any bias); the delta updates `y` in place (adds
    /// `s * B A x` for LoRA, rescales rows for DoRA).
    fn apply(
        &self,
        layer: usize,
        proj: Proj,
        x: &[f32],
        n: usize,
        y: &mut [f32],
    ) -> Result<(), DeltaError>;
}

/// Which delta (if any) each token of a batch uses.
#[derive(Default)]
pub struct BatchDeltas<'a> {
    /// Distinct deltas with the batch indices of their tokens, ascending.
    pub(crate) groups: Vec<(&'a dyn LinearDelta, Vec<usize>)>,
    n_tokens: usize,
}

/// Identity of a delta: its data address (trait-object metadata is not compared).
fn delta_addr(d: &dyn LinearDelta) -> *const () {
    d as *const dyn LinearDelta as *const ()
}

impl<'a> BatchDeltas<'a> {
    /// One entry per batch token; tokens naming the same delta object are grouped.
    pub fn per_token(deltas: &[Option<&'a dyn LinearDelta>]) -> Self {
        let mut groups: Vec<(&'a dyn LinearDelta, Vec<usize>)> = Vec::new();
        for (i, d) in deltas.iter().enumerate() {
            let Some(d) = *d else { continue };
            match groups
                .iter_mut()
                .find(|(g, _)| delta_addr(*g) == delta_addr(d))
            {
                Some((_, idx)) => idx.push(i),
                None => groups.push((d, vec![i])),
            }
        }
        BatchDeltas {
            groups,
            n_tokens: deltas.len(),
        }
    }

    /// Every one of `n_tokens` tokens uses `delta`.
    pub fn uniform(delta: &'a dyn LinearDelta, n_tokens: usize) -> Self {
        BatchDeltas {
            groups: vec![(delta, (0..n_tokens).collect())],
            n_tokens,
        }
    }

    /// Whether any delta of the batch changes (layer, proj).
    pub fn touches(&self, layer: usize, proj: Proj) -> bool {
        self.groups.iter().any(|(d, _)| d.touches(layer, proj))
    }

    /// Whether every delta of the batch is additive at (layer, proj).
    pub fn is_additive(&self, layer: usize, proj: Proj) -> bool {
        self.groups.iter().all(|(d, _)| d.is_additive(layer, proj))
    }

    /// The number of batch tokens this was built for.
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}
