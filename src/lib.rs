//! nibble: QLoRA fine-tuning of decoder-only language models with the frozen base in packed 4-bit form.
//!
//! The library compiles for `wasm32-unknown-unknown` too: nothing in it assumes memory maps, threads or
//! blocking I/O on that target (folders are read through memory maps only on native targets).

pub mod alloc;
pub mod config;
pub mod cpu;
pub mod data;
pub mod error;
pub mod exec;
pub mod fsutil;
pub mod generate;
pub mod gpu;
pub mod graph;
pub mod lora;
pub mod merge;
pub mod model;
pub mod models;
pub mod ops;
pub mod plan;
pub mod plot;
pub mod quant;
pub mod rng;
pub mod shared;
pub mod source;
pub mod synth;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
#[cfg(target_arch = "wasm32")]
pub mod web;
