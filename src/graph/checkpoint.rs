//! Gradient checkpointing as a transform of any graph: each block's forward nodes run again just before
//! the first backward node that reads what they produced, writing fresh buffers that the backward then
//! reads. The first run's results are then only read inside the forward, so liveness releases them as
//! soon as the next block has them; what stays alive across the step is each block's input. Recomputed
//! nodes whose results nothing reads (a layer's output, for instance) are left out. The recomputation
//! is the same ops on the same inputs, so the gradients are bit for bit those of the full graph (LoRA
//! dropout masks are counter-based: the recomputed mask is the same one).

use super::{BufId, Graph, Node, Role};
use std::collections::{HashMap, HashSet};

pub fn apply(graph: &Graph) -> Graph {
    let mut out = Graph {
        bufs: graph.bufs.clone(),
        nodes: Vec::with_capacity(graph.nodes.len() * 3 / 2),
    };
    let blocks: Vec<usize> = {
        let mut b: Vec<usize> = graph
            .nodes
            .iter()
            .filter(|n| !n.stage.backward)
            .filter_map(|n| n.stage.block)
            .collect();
        b.dedup();
        b
    };
    // Per block: its forward nodes and the transient buffers they write.
    let mut forward: HashMap<usize, Vec<&Node>> = HashMap::new();
    let mut produced: HashMap<usize, HashSet<BufId>> = HashMap::new();
    for node in graph.nodes.iter().filter(|n| !n.stage.backward) {
        if let Some(b) = node.stage.block {
            forward.entry(b).or_default().push(node);
            for &o in &node.outputs {
                if graph.bufs[o].role.is_transient() {
                    produced.entry(b).or_default().insert(o);
                }
            }
        }
    }
    // A block's output is read by the forward after it: that is the checkpoint, kept as it is.
    for node in graph.nodes.iter().filter(|n| !n.stage.backward) {
        for b in node.reads() {
            for (block, bufs) in produced.iter_mut() {
                if node.stage.block != Some(*block) {
                    bufs.remove(&b);
                }
            }
        }
    }
    // Which block produced each buffer the backward may need.
    let owner: HashMap<BufId, usize> = produced
        .iter()
        .flat_map(|(&b, bufs)| bufs.iter().map(move |&buf| (buf, b)))
        .collect();
    let mut remap: HashMap<BufId, BufId> = HashMap::new();
    let mut recomputed: HashSet<usize> = HashSet::new();
    for (i, node) in graph.nodes.iter().enumerate() {
        if node.stage.backward {
            let needs: Vec<usize> = node
                .reads()
                .filter_map(|b| owner.get(&b).copied())
                .filter(|b| !recomputed.contains(b))
                .collect();
            for block in needs {
                if recomputed.insert(block) {
                    recompute(
                        graph,
                        &forward[&block],
                        &produced[&block],
                        &graph.nodes[i..],
                        &mut out,
                        &mut remap,
                    );
                }
            }
            let mut node = node.clone();
            for b in node.inputs.iter_mut().chain(node.outputs.iter_mut()) {
                if let Some(&r) = remap.get(b) {
                    *b = r;
                }
            }
            out.nodes.push(node);
        } else {
            out.nodes.push(node.clone());
        }
    }
    debug_assert!(blocks.iter().all(|b| forward.contains_key(b)));
    out
}

/// Appends the block's forward nodes that produce something `rest` (the backward from here on) reads,
/// with every buffer the block produced replaced by a fresh copy.
fn recompute(
    graph: &Graph,
    nodes: &[&Node],
    produced: &HashSet<BufId>,
    rest: &[Node],
    out: &mut Graph,
    remap: &mut HashMap<BufId, BufId>,
) {
    // Walk backwards from what the rest of the step reads.
    let mut live: HashSet<BufId> = rest
        .iter()
        .flat_map(|n| n.reads().collect::<Vec<_>>())
        .filter(|b| produced.contains(b))
        .collect();
    let mut keep = vec![false; nodes.len()];
    for (i, node) in nodes.iter().enumerate().rev() {
        if node.outputs.iter().any(|o| live.contains(o)) {
            keep[i] = true;
            live.extend(node.reads().filter(|b| produced.contains(b)));
        }
    }
    for (node, _) in nodes.iter().zip(&keep).filter(|(_, k)| **k) {
        let mut node = (*node).clone();
        for b in node.inputs.iter_mut().chain(node.outputs.iter_mut()) {
            if produced.contains(b) {
                *b = *remap.entry(*b).or_insert_with(|| {
                    let mut desc = graph.bufs[*b].clone();
                    desc.name = format!("{} (recomputed)", desc.name);
                    debug_assert_eq!(desc.role, Role::Activation);
                    out.bufs.push(desc);
                    out.bufs.len() - 1
                });
            }
        }
        out.nodes.push(node);
    }
}
