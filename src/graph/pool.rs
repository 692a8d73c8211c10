//! Where the GPU executor keeps a step's buffers. wgpu binds whole buffers (a storage buffer bound
//! read-write may not share a dispatch with a read-only binding of itself, so one arena sliced per
//! activation cannot serve), so activations share device buffers ("homes"): buffers whose lifetimes
//! do not overlap live in one home, assigned from the whole graph before it is recorded. The plan
//! replays the same assignment (`device_step_bytes`), so what it reports is what the device holds.
//! Kernel temporaries and read-back outputs come from a pool of free buffers (`take`).

use super::{BufId, Graph, Node, Op, Role};
use std::collections::BTreeMap;

/// A free buffer serves a request of at least 1/SLACK of its capacity: reusing a larger buffer beats
/// creating another of the exact size (a run's many shapes would otherwise each keep their own), while
/// a small request does not take a buffer a later large one needs.
pub const SLACK: usize = 2;

/// Free buffers by capacity in words.
pub type Free<T> = BTreeMap<usize, Vec<T>>;

/// The smallest free buffer that holds `len` words, within `SLACK`.
pub fn take<T>(free: &mut Free<T>, len: usize) -> Option<T> {
    let len = len.max(1);
    free.range_mut(len..=len * SLACK)
        .find(|(_, buffers)| !buffers.is_empty())
        .and_then(|(_, buffers)| buffers.pop())
}

/// Each device activation's home, and each home's capacity in words.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Placement {
    pub home: Vec<Option<usize>>,
    pub capacities: Vec<usize>,
}

/// Largest buffer first, each into the smallest home that holds it and is free over its whole
/// lifetime (first write to last use, both included), else a new home of its size. Measured on klein
/// 9B's 1024 px step: 14% over the live bytes at the worst node, where taking freed buffers as the
/// step runs held 41% over them (BENCHMARKS.md, session 26).
pub fn place(graph: &Graph) -> Placement {
    let (first, last) = (graph.first_write(), graph.last_use());
    let mut order: Vec<(usize, usize, usize, BufId)> = (0..graph.bufs.len())
        .filter(|&b| graph.bufs[b].role == Role::Activation)
        .filter_map(|b| Some((graph.bufs[b].len.max(1), first[b]?, last[b]?, b)))
        .collect();
    order.sort_by(|x, y| y.0.cmp(&x.0).then(x.3.cmp(&y.3)));
    let mut placement = Placement {
        home: vec![None; graph.bufs.len()],
        capacities: Vec::new(),
    };
    // Per home, the lifetimes it holds.
    let mut lives: Vec<Vec<(usize, usize)>> = Vec::new();
    for (len, start, end, b) in order {
        let free = |held: &Vec<(usize, usize)>| held.iter().all(|&(s, e)| end < s || e < start);
        let home = (0..lives.len())
            .filter(|&h| placement.capacities[h] >= len && free(&lives[h]))
            .min_by_key(|&h| placement.capacities[h]);
        let home = home.unwrap_or_else(|| {
            placement.capacities.push(len);
            lives.push(Vec::new());
            lives.len() - 1
        });
        lives[home].push((start, end));
        placement.home[b] = Some(home);
    }
    placement
}

/// The scratch buffers (words) a node's GPU lowering takes from the pool while it is recorded, and
/// returns after it (the ops' `record` functions): the linears read the packed weights in place.
fn device_temporaries(graph: &Graph, node: &Node) -> Vec<usize> {
    match &node.op {
        // The first-key table (when the step has none), and in the backward each query head's
        // share of dk and dv.
        Op::Attention { shape } => vec![shape.tokens],
        Op::AttentionBackward { shape } => {
            let q = shape.tokens * shape.heads * shape.head_dim;
            vec![shape.tokens, q, q]
        }
        Op::CachedAttention { shape, past } => {
            vec![shape.tokens, 2 * shape.heads * (past + shape.tokens)]
        }
        // One vocabulary chunk's logits, the full chunk whatever the vocabulary.
        Op::CrossEntropy { dim, .. }
        | Op::CrossEntropyWithGrad { dim, .. }
        | Op::Logits { dim, .. } => {
            vec![graph.bufs[node.inputs[0]].len / dim * crate::ops::cross_entropy::VOCAB_CHUNK]
        }
        Op::Conv2d { shape } => {
            let (oh, ow) = shape.output();
            let patch = shape.channels * shape.kernel * shape.kernel;
            vec![shape.tile_pixels().min(oh * ow) * patch]
        }
        _ => Vec::new(),
    }
}

/// What the GPU executor holds for one step of `graph` from an empty pool: its activations' homes,
/// and what it takes from the pool as it records (outputs it reads back, kept; kernel temporaries,
/// returned after each node), replayed through `take`.
pub fn device_step_bytes(graph: &Graph) -> u64 {
    let homes: u64 = place(graph).capacities.iter().map(|&c| c as u64).sum();
    let first = graph.first_write();
    let mut free: Free<usize> = Free::new();
    let mut pooled = 0u64;
    let mut take_or_create = |free: &mut Free<usize>, len: usize| {
        take(free, len).unwrap_or_else(|| {
            pooled += len.max(1) as u64;
            len.max(1)
        })
    };
    for (i, node) in graph.nodes.iter().enumerate() {
        for &b in &node.outputs {
            if matches!(graph.bufs[b].role, Role::Output(_)) && first[b] == Some(i) {
                take_or_create(&mut free, graph.bufs[b].len);
            }
        }
        let held: Vec<usize> = device_temporaries(graph, node)
            .into_iter()
            .map(|len| take_or_create(&mut free, len))
            .collect();
        for capacity in held {
            free.entry(capacity).or_default().push(capacity);
        }
    }
    4 * (homes + pooled)
}
