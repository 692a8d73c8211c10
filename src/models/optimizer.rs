//! The optimizer step as a graph, for any model's LoRA matrices: the global gradient norm and its
//! clipping coefficient, then AdamW on every matrix in place. Both executors run it after a step's
//! forward and backward passes have accumulated the gradients.

use crate::graph::{Builder, Graph, Input, Op, Role};
use crate::lora::LoraAdapter;

/// The (module path, A's length, B's length) of each of `adapter`'s pairs, what `build` takes.
pub fn shapes(adapter: &LoraAdapter) -> Vec<(String, usize, usize)> {
    adapter
        .pairs()
        .map(|(path, p)| (path.to_string(), p.a.len(), p.b.len()))
        .collect()
}

/// The optimizer graph of LoRA pairs (module path, A's length, B's length), clipping the global norm at
/// `max_norm` (≤ 0: no clipping). Its output `clip` is [global norm, clipping coefficient].
pub fn build(pairs: &[(String, usize, usize)], max_norm: f64) -> Graph {
    let mut b = Builder::new();
    let matrices: Vec<(String, bool, usize)> = pairs
        .iter()
        .flat_map(|(path, a, bl)| [(path.clone(), false, *a), (path.clone(), true, *bl)])
        .collect();
    let grad = |b: &mut Builder, path: &str, is_b: bool, len: usize| {
        let role = if is_b {
            Role::LoraGradB(path.to_string())
        } else {
            Role::LoraGradA(path.to_string())
        };
        b.lora(role, len)
    };
    let grads: Vec<_> = matrices
        .iter()
        .map(|(path, is_b, len)| grad(&mut b, path, *is_b, *len))
        .collect();
    let clip = b.output("clip", 2);
    b.node(Op::GradNorm { max_norm }, &grads, &[clip], false);
    let hyper = b.input(Input::AdamW, 8);
    for ((path, is_b, len), g) in matrices.iter().zip(grads) {
        let param = if *is_b {
            Role::LoraB(path.clone())
        } else {
            Role::LoraA(path.clone())
        };
        let param = b.lora(param, *len);
        let moment = |b: &mut Builder, second| {
            let role = Role::Moment {
                path: path.clone(),
                b: *is_b,
                second,
            };
            b.state(role, *len)
        };
        let (m, v) = (moment(&mut b, false), moment(&mut b, true));
        b.node(Op::AdamW, &[g, clip, hyper], &[param, m, v], false);
    }
    b.finish()
}
