//! Shared helpers for graft's benchmarks.
