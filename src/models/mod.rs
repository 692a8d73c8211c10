//! Models, each written once as a graph builder.

pub mod decoder;
pub mod optimizer;
