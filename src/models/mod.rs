//! Models, each written once as a graph builder.

pub mod decoder;
pub mod flux2;
pub mod flux2_sampler;
pub mod lora_linear;
pub mod optimizer;
pub mod vae;
