//! AdamW with decoupled weight decay, a warmup + cosine learning-rate schedule and
//! global-norm gradient clipping, over one flat parameter vector.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// Optimizer state: first and second moments, one per parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub config: AdamWConfig,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Steps taken (for bias correction).
    pub t: u64,
}

impl AdamW {
    pub fn new(config: AdamWConfig, n: usize) -> Self {
        AdamW {
            config,
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }

    /// Forgets the moments (SaRA's progressive re-selection restarts them).
    pub fn reset(&mut self, n: usize) {
        self.m = vec![0.0; n];
        self.v = vec![0.0; n];
        self.t = 0;
    }

    /// One step at learning rate `lr`; `decay[i]` says whether parameter `i` decays
    /// (None: all do).
    pub fn step(&mut self, params: &mut [f32], grad: &[f32], lr: f32, decay: Option<&[bool]>) {
        self.t += 1;
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(self.t.min(i32::MAX as u64) as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t.min(i32::MAX as u64) as i32);
        for (i, ((p, &g), (m, v))) in params
            .iter_mut()
            .zip(grad)
            .zip(self.m.iter_mut().zip(self.v.iter_mut()))
            .enumerate()
        {
            if decay.is_none_or(|d| d.get(i).copied().unwrap_or(true)) {
                *p -= lr * c.weight_decay * *p;
            }
            *m = c.beta1 * *m + (1.0 - c.beta1) * g;
            *v = c.beta2 * *v + (1.0 - c.beta2) * g * g;
            let mh = *m / bc1;
            let vh = *v / bc2;
            *p -= lr * mh / (vh.sqrt() + c.eps);
        }
    }
}

/// Linear warmup to `lr`, then cosine decay to `lr * min_ratio` at `total` steps.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Schedule {
    pub lr: f32,
    pub warmup: usize,
    pub total: usize,
    pub min_ratio: f32,
}

impl Schedule {
    /// The learning rate of step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f32 {
        if self.warmup > 0 && step < self.warmup {
            return self.lr * (step + 1) as f32 / self.warmup as f32;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup.min(step)) as f32 / span as f32).min(1.0);
        let cos = 0.5 * (1.0 + (std::f32::consts::PI * progress).cos());
        self.lr * (self.min_ratio + (1.0 - self.min_ratio) * cos)
    }
}

/// Scales `grad` so its global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grad: &mut [f32], max_norm: f32) -> f32 {
    let norm = grad
        .iter()
        .map(|&g| (g as f64) * (g as f64))
        .sum::<f64>()
        .sqrt() as f32;
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / norm;
        for g in grad {
            *g *= s;
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_first_step_moves_by_lr_times_sign() {
        let mut opt = AdamW::new(
            AdamWConfig {
                weight_decay: 0.0,
                ..Default::default()
            },
            3,
        );
        let mut p = vec![1.0, -1.0, 0.5];
        opt.step(&mut p, &[2.0, -0.5, 0.0], 0.1, None);
        // Bias-corrected m/sqrt(v) is sign(g) on the first step.
        assert!((p[0] - 0.9).abs() < 1e-6 && (p[1] + 0.9).abs() < 1e-6);
        assert_eq!(p[2], 0.5);
    }

    #[test]
    fn decoupled_decay_skips_masked_parameters() {
        let mut opt = AdamW::new(AdamWConfig::default(), 2);
        let mut p = vec![1.0, 1.0];
        opt.step(&mut p, &[0.0, 0.0], 0.5, Some(&[true, false]));
        assert!((p[0] - (1.0 - 0.5 * 1e-2)).abs() < 1e-7);
        assert_eq!(p[1], 1.0);
    }

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let s = Schedule {
            lr: 1.0,
            warmup: 4,
            total: 14,
            min_ratio: 0.1,
        };
        assert_eq!(s.lr_at(0), 0.25);
        assert_eq!(s.lr_at(3), 1.0);
        assert_eq!(s.lr_at(4), 1.0);
        assert!((s.lr_at(9) - 0.55).abs() < 1e-6);
        assert!((s.lr_at(14) - 0.1).abs() < 1e-6);
        assert!(s.lr_at(6) > s.lr_at(7));
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let mut g = vec![3.0, 4.0];
        assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
        assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6);
        let mut h = vec![0.3, 0.4];
        clip_grad_norm(&mut h, 1.0);
        assert_eq!(h, vec![0.3, 0.4]);
    }
}
