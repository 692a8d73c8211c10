//! Executors: each runs the graphs that `models` build.

pub mod cpu;
pub mod gpu;
