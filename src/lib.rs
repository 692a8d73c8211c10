//! nibble: QLoRA fine-tuning of decoder-only language models with the frozen base in packed 4-bit form.
//!
//! The library compiles for `wasm32-unknown-unknown` too: nothing in it assumes memory maps, threads or
//! blocking I/O on that target (folders are read through memory maps only on native targets).

/// serde for a `clap::ValueEnum`: the same names as on the command line, matched ignoring case, so an
/// option file, the browser's JSON and the flags accept the same values.
macro_rules! serde_as_value_enum {
    ($($t:ty),*) => {$(
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let value = clap::ValueEnum::to_possible_value(self).expect("no skipped variants");
                s.serialize_str(value.get_name())
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <String as serde::Deserialize>::deserialize(d)?;
                <$t as clap::ValueEnum>::from_str(&text, true).map_err(|_| {
                    let names: Vec<String> = <$t as clap::ValueEnum>::value_variants()
                        .iter()
                        .filter_map(clap::ValueEnum::to_possible_value)
                        .map(|v| v.get_name().to_string())
                        .collect();
                    serde::de::Error::custom(format!(
                        "unknown value `{text}` (one of: {})",
                        names.join(", ")
                    ))
                })
            }
        }
    )*};
}

/// A value's name as the command line and option files spell it.
pub fn value_name<T: clap::ValueEnum>(value: T) -> String {
    value
        .to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_string())
}

pub mod alloc;
pub mod comfy_quant;
pub mod config;
pub mod cpu;
pub mod data;
pub mod error;
pub mod exec;
pub mod fsutil;
pub mod generate;
pub mod gpu;
pub mod graph;
pub mod images;
pub mod lora;
pub mod lowrank;
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
#[cfg(not(target_arch = "wasm32"))]
pub mod tables;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
#[cfg(target_arch = "wasm32")]
pub mod web;
