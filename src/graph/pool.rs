//! Where the GPU executor keeps a step's buffers. wgpu binds whole buffers (a storage buffer bound
//! read-write may not share a dispatch with a read-only binding of itself, so one arena sliced per
//! activation cannot serve), so a step's activations and its kernels' temporaries share device
//! buffers ("homes"): buffers whose lifetimes do not overlap live in one home, assigned from the whole
//! graph before it is recorded. The plan replays the same assignment (`device_step_bytes`), so what it
//! reports is what the device holds. Read-back outputs, and any temporary a kernel takes beyond its
//! planned ones, come from a pool of free buffers (`take`).

use super::{Graph, Node, Op, Role};
use std::collections::BTreeMap;

/// A free buffer serves a request of at least 1/SLACK of its capacity: reusing a larger buffer beats
/// creating another of the exact size (a run's many shapes would otherwise each keep their own), while
/// a small request does not take a buffer a later large one needs.
pub const SLACK: usize = 2;

/// Positions by which a decoding step's attention statistics are planned (`device_temporaries`).
const DECODE_STATS_STEP: usize = 256;

/// Free buffers by capacity in words.
pub type Free<T> = BTreeMap<usize, Vec<T>>;

/// The smallest free buffer that holds `len` words, within `SLACK`.
pub fn take<T>(free: &mut Free<T>, len: usize) -> Option<T> {
    let len = len.max(1);
    free.range_mut(len..=len * SLACK)
        .find(|(_, buffers)| !buffers.is_empty())
        .and_then(|(_, buffers)| buffers.pop())
}

/// The smallest free buffer that holds `len` words, however much larger: for a step's homes, taken
/// all at once before it is recorded, so that no later request of the step needs what they take.
pub fn take_at_least<T>(free: &mut Free<T>, len: usize) -> Option<T> {
    free.range_mut(len.max(1)..)
        .find(|(_, buffers)| !buffers.is_empty())
        .and_then(|(_, buffers)| buffers.pop())
}

/// Each device activation's home, each node's temporaries' homes (in the order its lowering asks for
/// them), and each home's capacity in words.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Placement {
    pub home: Vec<Option<usize>>,
    pub temporaries: Vec<Vec<usize>>,
    pub capacities: Vec<usize>,
}

/// A buffer to place: words, first and last node (both included), and which (an index into the
/// graph's buffers, then the nodes' temporaries in order).
type Lifetime = (usize, usize, usize, usize);

/// Where the activations and temporaries live: largest buffer first, each into the smallest home
/// that holds it and is free over its whole lifetime, else a new home of its size. Measured against
/// the live bytes at the worst node: Llama-3.1-8B's checkpointed steps 1-4% over them, klein 9B's
/// 1024 px step 16% (4.72 GiB for 4.08), where taking freed buffers in node order as the step runs
/// needed 5.87 GiB there (BENCHMARKS.md, session 26).
pub fn place(graph: &Graph) -> Placement {
    let (first, last) = (graph.first_write(), graph.last_use());
    let mut lifetimes: Vec<Lifetime> = (0..graph.bufs.len())
        .filter(|&b| graph.bufs[b].role == Role::Activation)
        .filter_map(|b| Some((graph.bufs[b].len.max(1), first[b]?, last[b]?, b)))
        .collect();
    let mut temporaries = Vec::with_capacity(graph.nodes.len());
    let mut id = graph.bufs.len();
    for (i, node) in graph.nodes.iter().enumerate() {
        let lens = device_temporaries(graph, node);
        temporaries.push((id..id + lens.len()).collect::<Vec<_>>());
        lifetimes.extend(lens.into_iter().map(|len| {
            id += 1;
            (len.max(1), i, i, id - 1)
        }));
    }
    let (home, capacities) = largest_first(id, lifetimes);
    Placement {
        temporaries: temporaries
            .into_iter()
            .map(|ids| ids.into_iter().map(|t| home[t].expect("placed")).collect())
            .collect(),
        home: home[..graph.bufs.len()].to_vec(),
        capacities,
    }
}

fn largest_first(count: usize, mut lifetimes: Vec<Lifetime>) -> (Vec<Option<usize>>, Vec<usize>) {
    lifetimes.sort_by(|x, y| y.0.cmp(&x.0).then(x.3.cmp(&y.3)));
    let (mut home, mut capacities) = (vec![None; count], Vec::new());
    // Per home, the lifetimes it holds, in order: they never overlap, so ordered by start they are
    // ordered by end too, and whether one more fits is one binary search (a scan of them all made a
    // plan of millions of tokens, whose graph has many small buffers, take minutes).
    let mut lives: Vec<Vec<(usize, usize)>> = Vec::new();
    for (len, start, end, id) in lifetimes {
        let slot = |held: &Vec<(usize, usize)>| {
            let after = held.partition_point(|&(s, _)| s <= end);
            let free = after == 0 || held[after - 1].1 < start;
            free.then_some(after)
        };
        let fits = (0..lives.len())
            .filter(|&h| capacities[h] >= len)
            .filter_map(|h| slot(&lives[h]).map(|at| (h, at)))
            .min_by_key(|&(h, _)| capacities[h]);
        let (h, at) = fits.unwrap_or_else(|| {
            capacities.push(len);
            lives.push(Vec::new());
            (lives.len() - 1, 0)
        });
        lives[h].insert(at, (start, end));
        home[id] = Some(h);
    }
    (home, capacities)
}

/// The scratch buffers (words) a node's GPU lowering takes from the pool while it is recorded, and
/// returns after it (the ops' `record` functions): the linears read the packed weights in place.
fn device_temporaries(graph: &Graph, node: &Node) -> Vec<usize> {
    let len = |i: usize| graph.bufs[node.inputs[i]].len;
    // Attention takes a first-key table of its own where the step gives none (an input at `given`).
    let first_key = |tokens: usize, given: usize| match node.inputs.len() > given {
        true => Vec::new(),
        false => vec![tokens],
    };
    match &node.op {
        Op::Attention { shape } => first_key(shape.tokens, shape.masks_at()),
        // And each query head's share of dk and dv.
        Op::AttentionBackward { shape } => {
            let q = shape.tokens * shape.heads * shape.head_dim;
            [first_key(shape.tokens, 6), vec![q, q]].concat()
        }
        // Its statistics over every position so far, planned for the next multiple of
        // `DECODE_STATS_STEP` positions: decoding grows them a token at a time, and a step whose
        // homes the pool cannot house makes them all anew.
        Op::CachedAttention { shape, past } => {
            let positions = (past + shape.tokens).next_multiple_of(DECODE_STATS_STEP);
            [
                first_key(shape.tokens, shape.masks_at()),
                vec![2 * shape.heads * positions],
            ]
            .concat()
        }
        // One vocabulary chunk's logits, the full chunk whatever the vocabulary.
        Op::CrossEntropy { dim, .. } | Op::CrossEntropyWithGrad { dim, .. } => {
            vec![len(0) / dim * crate::ops::cross_entropy::VOCAB_CHUNK]
        }
        Op::Conv2d { shape } => {
            let (oh, ow) = shape.output();
            let patch = shape.channels * shape.kernel * shape.kernel;
            vec![shape.tile_pixels().min(oh * ow) * patch]
        }
        Op::GroupNorm {
            channels, groups, ..
        } => vec![crate::ops::conv::group_norm_stats_len(
            len(0),
            *channels,
            *groups,
        )],
        Op::MoeExperts { shape, lora, .. } | Op::MoeExpertsBackward { shape, lora, .. } => {
            let backward = matches!(node.op, Op::MoeExpertsBackward { .. });
            crate::ops::moe::gpu_temporaries(shape, lora, len(0) / shape.hidden, backward)
        }
        Op::GradNorm { .. } => {
            vec![crate::ops::adamw::sum_squares_len(
                (0..node.inputs.len()).map(len),
            )]
        }
        _ => Vec::new(),
    }
}

/// What the GPU executor holds for one step of `graph` from an empty pool: the homes of its
/// activations and temporaries, and the outputs it reads back (each from the pool, kept).
pub fn device_step_bytes(graph: &Graph) -> u64 {
    let homes: u64 = place(graph).capacities.iter().map(|&c| c as u64).sum();
    let outputs: u64 = graph
        .bufs
        .iter()
        .filter(|b| matches!(b.role, Role::Output(_)))
        .map(|b| b.len.max(1) as u64)
        .sum();
    4 * (homes + outputs)
}
