//! Unquantized element types: F32, F16 and BF16 rows, little-endian.

use half::{bf16, f16};

pub(crate) fn f32_from_le(src: &[u8], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    }
}

pub(crate) fn f32_to_le(src: &[f32], dst: &mut [u8]) {
    for (s, d) in src.iter().zip(dst.chunks_exact_mut(4)) {
        d.copy_from_slice(&s.to_le_bytes());
    }
}

pub(crate) fn f16_to_f32_row(src: &[u8], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = f16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32();
    }
}

/// Round to nearest even, as ggml (F16C `_cvtss_sh` and its software fallback).
pub(crate) fn f32_to_f16_row(src: &[f32], dst: &mut [u8]) {
    for (s, d) in src.iter().zip(dst.chunks_exact_mut(2)) {
        d.copy_from_slice(&f16::from_f32(*s).to_bits().to_le_bytes());
    }
}

pub(crate) fn bf16_to_f32_row(src: &[u8], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = bf16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32();
    }
}

/// Round to nearest even with NaN kept quiet, as `ggml_compute_fp32_to_bf16`.
pub(crate) fn f32_to_bf16_row(src: &[f32], dst: &mut [u8]) {
    for (s, d) in src.iter().zip(dst.chunks_exact_mut(2)) {
        d.copy_from_slice(&f32_to_bf16_bits(*s).to_le_bytes());
    }
}

fn f32_to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_matches_ggml_rounding() {
        assert_eq!(f32_to_bf16_bits(1.0), 0x3f80);
        // exactly halfway between two bf16 values: ties to even
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(f32_to_bf16_bits(f32::NAN) & 0x7fc0, 0x7fc0);
        for x in [0.1f32, -3.75, 1e-30, 65504.0] {
            assert_eq!(f32_to_bf16_bits(x), bf16::from_f32(x).to_bits());
        }
    }

    #[test]
    fn f16_round_trip() {
        let src = [1.0f32, -2.5, 0.333, 65504.0];
        let mut b = [0u8; 8];
        f32_to_f16_row(&src, &mut b);
        let mut back = [0f32; 4];
        f16_to_f32_row(&b, &mut back);
        assert_eq!(back[0], 1.0);
        assert_eq!(back[1], -2.5);
        assert!((back[2] - 0.333).abs() < 1e-3);
        assert_eq!(back[3], 65504.0);
    }
}
