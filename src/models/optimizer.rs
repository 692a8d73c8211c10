//! The optimizer step as a graph, for any model's LoRA tensors: the global gradient norm and its
//! clipping coefficient, then AdamW on every tensor in place. Both executors run it after a step's
//! forward and backward passes have accumulated the gradients.

use crate::graph::{Builder, Graph, Input, Op, Role};
use crate::lora::{Factor, LoraAdapter};

/// The (module path, factor, length) of each tensor `adapter` trains, what `build` takes.
pub fn shapes(adapter: &LoraAdapter) -> Vec<(String, Factor, usize)> {
    adapter
        .trained()
        .flat_map(|(path, p)| {
            p.factors()
                .map(move |f| (path.to_string(), f, p.factor(f).len()))
        })
        .collect()
}

/// The optimizer graph of trained tensors (module path, factor, length), clipping the global norm at
/// `max_norm` (≤ 0: no clipping). Its output `clip` is [global norm, clipping coefficient].
pub fn build(tensors: &[(String, Factor, usize)], max_norm: f64) -> Graph {
    let mut b = Builder::new();
    let grads: Vec<_> = tensors
        .iter()
        .map(|(path, factor, len)| {
            let role = Role::LoraGrad {
                path: path.clone(),
                factor: *factor,
            };
            b.lora(role, *len)
        })
        .collect();
    let clip = b.output("clip", 2);
    b.node(Op::GradNorm { max_norm }, &grads, &[clip], false);
    let hyper = b.input(Input::AdamW, 8);
    for ((path, factor, len), g) in tensors.iter().zip(grads) {
        let param = Role::Lora {
            path: path.clone(),
            factor: *factor,
        };
        let param = b.lora(param, *len);
        let moment = |b: &mut Builder, second| {
            let role = Role::Moment {
                path: path.clone(),
                factor: *factor,
                second,
            };
            b.state(role, *len)
        };
        let (m, v) = (moment(&mut b, false), moment(&mut b, true));
        b.node(Op::AdamW, &[g, clip, hyper], &[param, m, v], false);
    }
    b.finish()
}
