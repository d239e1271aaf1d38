//! Paged KV cache: fixed-size blocks of token slots, handed to sequences on demand,
//! so many sequences of different lengths share one pool (and the server can page and
//! preempt them later).
//!
//! A block holds `block_size` token slots for every layer; a sequence owns a block
//! table. Keys and values are stored in f16 by default (as llama.cpp does), or f32.

use std::collections::HashMap;

use half::f16;

/// Identifies one sequence in the cache.
pub type SeqId = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvType {
    F16,
    F32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KvError {
    #[error("KV cache full: sequence {seq} needs {needed} more blocks of {block_size} tokens, {free} free of {total}")]
    OutOfBlocks {
        seq: SeqId,
        needed: usize,
        free: usize,
        total: usize,
        block_size: usize,
    },
    #[error("sequence {0} is not in the KV cache")]
    UnknownSequence(SeqId),
    #[error("sequence {seq}: position {pos} is past its length {len} (positions must be written in order)")]
    Gap { seq: SeqId, pos: usize, len: usize },
}

enum Storage {
    F16 { k: Vec<f16>, v: Vec<f16> },
    F32 { k: Vec<f32>, v: Vec<f32> },
}

#[derive(Debug, Default, Clone)]
struct SeqState {
    blocks: Vec<u32>,
    len: usize,
}

pub struct KvCache {
    n_layer: usize,
    kv_dim: usize,
    block_size: usize,
    n_blocks: usize,
    storage: Storage,
    free: Vec<u32>,
    seqs: HashMap<SeqId, SeqState>,
}

impl KvCache {
    /// A pool of `n_blocks` blocks of `block_size` tokens.
    pub fn new(
        n_layer: usize,
        kv_dim: usize,
        n_blocks: usize,
        block_size: usize,
        ty: KvType,
    ) -> KvCache {
        let block_size = block_size.max(1);
        let len = n_blocks * n_layer * block_size * kv_dim;
        let storage = match ty {
            KvType::F16 => Storage::F16 {
                k: vec![f16::ZERO; len],
                v: vec![f16::ZERO; len],
            },
            KvType::F32 => Storage::F32 {
                k: vec![0.0; len],
                v: vec![0.0; len],
            },
        };
        KvCache {
            n_layer,
            kv_dim,
            block_size,
            n_blocks,
            storage,
            // popped from the back: hand out low block ids first
            free: (0..n_blocks as u32).rev().collect(),
            seqs: HashMap::new(),
        }
    }

    /// A cache able to hold `n_ctx` tokens in total.
    pub fn for_context(n_layer: usize, kv_dim: usize, n_ctx: usize, ty: KvType) -> KvCache {
        const BLOCK: usize = 32;
        KvCache::new(n_layer, kv_dim, n_ctx.div_ceil(BLOCK), BLOCK, ty)
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total_blocks(&self) -> usize {
        self.n_blocks
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Bytes of K and V storage.
    pub fn bytes(&self) -> usize {
        match &self.storage {
            Storage::F16 { k, v } => (k.len() + v.len()) * 2,
            Storage::F32 { k, v } => (k.len() + v.len()) * 4,
        }
    }

    /// Tokens stored for `seq` (0 if unknown).
    pub fn seq_len(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.len)
    }

    /// Frees every block of `seq`.
    pub fn remove(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            self.free.extend(s.blocks.into_iter().rev());
        }
    }

    /// Forgets positions >= `len` of `seq` (to rewind), freeing whole blocks.
    pub fn truncate(&mut self, seq: SeqId, len: usize) {
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.len = s.len.min(len);
            let keep = s.len.div_ceil(self.block_size);
            while s.blocks.len() > keep {
                if let Some(b) = s.blocks.pop() {
                    self.free.push(b);
                }
            }
        }
    }

    /// Removes every sequence.
    pub fn clear(&mut self) {
        let ids: Vec<SeqId> = self.seqs.keys().copied().collect();
        for id in ids {
            self.remove(id);
        }
    }

    /// Makes room for `seq` to hold positions up to `new_len` (exclusive), allocating
    /// blocks. Either all needed blocks are allocated or none.
    pub fn reserve(&mut self, seq: SeqId, new_len: usize) -> Result<(), KvError> {
        let have = self.seqs.get(&seq).map_or(0, |s| s.blocks.len());
        let need = new_len.div_ceil(self.block_size).saturating_sub(have);
        if need > self.free.len() {
            return Err(KvError::OutOfBlocks {
                seq,
                needed: need,
                free: self.free.len(),
                total: self.n_blocks,
                block_size: self.block_size,
            });
        }
        let s = self.seqs.entry(seq).or_default();
        for _ in 0..need {
            if let Some(b) = self.free.pop() {
                s.blocks.push(b);
            }
        }
        Ok(())
    }

    /// Records that `seq` now holds positions `< len` (after they were written).
    pub(crate) fn set_len(&mut self, seq: SeqId, len: usize) {
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.len = s.len.max(len);
        }
    }

    /// Checks that writing position `pos` keeps `seq` contiguous.
    pub(crate) fn check_pos(&self, seq: SeqId, pos: usize, pending: usize) -> Result<(), KvError> {
        let len = self.seq_len(seq).max(pending);
        if pos > len {
            return Err(KvError::Gap { seq, pos, len });
        }
        Ok(())
    }

    /// Element offset of (layer, seq, pos) in the storage.
    fn offset(&self, layer: usize, seq: SeqId, pos: usize) -> Result<usize, KvError> {
        let s = self.seqs.get(&seq).ok_or(KvError::UnknownSequence(seq))?;
        let block = *s.blocks.get(pos / self.block_size).ok_or(KvError::Gap {
            seq,
            pos,
            len: s.len,
        })? as usize;
        let slot = pos % self.block_size;
        Ok((((block * self.n_layer) + layer) * self.block_size + slot) * self.kv_dim)
    }

    /// Stores one token's keys and values (`kv_dim` each) for `layer`.
    pub(crate) fn write(
        &mut self,
        layer: usize,
        seq: SeqId,
        pos: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), KvError> {
        let o = self.offset(layer, seq, pos)?;
        let n = self.kv_dim;
        match &mut self.storage {
            Storage::F16 { k: ks, v: vs } => {
                for (d, s) in ks[o..o + n].iter_mut().zip(k) {
                    *d = f16::from_f32(*s);
                }
                for (d, s) in vs[o..o + n].iter_mut().zip(v) {
                    *d = f16::from_f32(*s);
                }
            }
            Storage::F32 { k: ks, v: vs } => {
                ks[o..o + n].copy_from_slice(&k[..n]);
                vs[o..o + n].copy_from_slice(&v[..n]);
            }
        }
        Ok(())
    }

    /// Reads positions `0..len` of `seq` at `layer` for one KV head (`head_dim` wide,
    /// starting at `head_off` within a row): keys into `k_out`, values into `v_out`,
    /// each `len * head_dim` f32, position-major.
    pub(crate) fn read_head(
        &self,
        (layer, seq, len): (usize, SeqId, usize),
        (head_off, head_dim): (usize, usize),
        k_out: &mut [f32],
        v_out: &mut [f32],
    ) -> Result<(), KvError> {
        let mut pos = 0;
        while pos < len {
            let o = self.offset(layer, seq, pos)?;
            let run = (self.block_size - pos % self.block_size).min(len - pos);
            for j in 0..run {
                let src = o + j * self.kv_dim + head_off;
                let dst = (pos + j) * head_dim;
                match &self.storage {
                    Storage::F16 { k, v } => {
                        widen(&k[src..src + head_dim], &mut k_out[dst..dst + head_dim]);
                        widen(&v[src..src + head_dim], &mut v_out[dst..dst + head_dim]);
                    }
                    Storage::F32 { k, v } => {
                        k_out[dst..dst + head_dim].copy_from_slice(&k[src..src + head_dim]);
                        v_out[dst..dst + head_dim].copy_from_slice(&v[src..src + head_dim]);
                    }
                }
            }
            pos += run;
        }
        Ok(())
    }
}

fn widen(src: &[f16], dst: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    src.convert_to_f32_slice(dst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_allocated_and_freed() {
        let mut c = KvCache::new(2, 4, 3, 2, KvType::F32);
        c.reserve(7, 3).unwrap();
        assert_eq!(c.free_blocks(), 1);
        assert!(matches!(
            c.reserve(8, 3),
            Err(KvError::OutOfBlocks {
                needed: 2,
                free: 1,
                ..
            })
        ));
        // a failed reservation takes nothing
        assert_eq!(c.free_blocks(), 1);
        c.remove(7);
        assert_eq!(c.free_blocks(), 3);
        c.reserve(8, 6).unwrap();
        assert_eq!(c.free_blocks(), 0);
        c.set_len(8, 6);
        c.truncate(8, 1);
        assert_eq!(c.free_blocks(), 2);
    }

    #[test]
    fn write_then_read_round_trips_across_blocks() {
        for ty in [KvType::F32, KvType::F16] {
            let mut c = KvCache::new(2, 4, 4, 2, ty);
            c.reserve(1, 5).unwrap();
            for pos in 0..5 {
                let k: Vec<f32> = (0..4).map(|i| (pos * 10 + i) as f32).collect();
                let v: Vec<f32> = k.iter().map(|x| -x).collect();
                c.write(1, 1, pos, &k, &v).unwrap();
            }
            c.set_len(1, 5);
            let (mut k, mut v) = (vec![0.0; 10], vec![0.0; 10]);
            c.read_head((1, 1, 5), (2, 2), &mut k, &mut v).unwrap();
            assert_eq!(
                k,
                vec![2.0, 3.0, 12.0, 13.0, 22.0, 23.0, 32.0, 33.0, 42.0, 43.0]
            );
            assert_eq!(v[9], -43.0);
        }
    }
}
