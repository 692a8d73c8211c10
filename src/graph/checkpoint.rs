//! Gradient checkpointing as a transform of any graph: each block's forward nodes run again just before
//! the first backward node that reads what they produced, writing fresh buffers that the backward then
//! reads. The first run's results are then only read inside the forward, so liveness releases them as
//! soon as the next block has them; what stays alive across the step is each block's input. Recomputed
//! nodes whose results nothing reads (a layer's output, for instance) are left out. The recomputation
//! is the same ops on the same inputs, so the gradients are bit for bit those of the full graph (LoRA
//! dropout masks are counter-based: the recomputed mask is the same one).

use super::{BufDesc, BufId, Dtype, Graph, Node, Op, Role, Stage};
use std::collections::{HashMap, HashSet};

/// How the checkpoints (each block's inputs from outside it) are kept between the forward and the
/// block's recomputation; ordered from the most device memory to the least.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Keep {
    /// As computed: the gradients are bit for bit those of the full graph.
    #[default]
    F32,
    /// Rounded to bf16 after the forward writes them, at half the memory; the block's recomputation
    /// and backward read the rounded values (the forward itself reads the exact ones).
    Bf16,
    /// As `Bf16`, and moved to host memory (`Role::Offloaded`) until the block's backward copies them
    /// back: the device holds one block's checkpoints at a time, for two copies over the bus per
    /// checkpoint. The numbers are `Bf16`'s, bit for bit.
    Bf16Host,
}

impl Keep {
    /// Whether checkpoints are rounded to bf16.
    pub fn bf16(self) -> bool {
        self != Keep::F32
    }

    /// The kinds from the most memory to the least.
    pub const ALL: [Keep; 3] = [Keep::F32, Keep::Bf16, Keep::Bf16Host];

    /// The checkpointing that the flags `--gradient-checkpointing`, `--bf16-checkpoints` and
    /// `--offload-checkpoints` ask for. Either of the last two implies checkpointing, and offloaded
    /// checkpoints are bf16; a `false` alone only narrows nibble's choice (`--offload-checkpoints
    /// false`: checkpoints stay on the device). Contradictions are errors naming the flags.
    pub fn from_flags(
        checkpointing: Option<bool>,
        bf16: Option<bool>,
        offload: Option<bool>,
    ) -> Result<Asked, String> {
        for (flag, asked) in [("bf16", bf16), ("offload", offload)] {
            if checkpointing == Some(false) && asked == Some(true) {
                return Err(format!(
                    "--{flag}-checkpoints is a kind of gradient checkpointing: drop \
                     --gradient-checkpointing false"
                ));
            }
        }
        if offload == Some(true) && bf16 == Some(false) {
            return Err(
                "offloaded checkpoints are kept in bf16: drop --bf16-checkpoints false".into(),
            );
        }
        let keep = match (offload, bf16) {
            (Some(true), _) => Keep::Bf16Host,
            (_, Some(true)) => Keep::Bf16,
            _ => Keep::F32,
        };
        Ok(match (checkpointing, keep) {
            (None, Keep::F32) => Asked::Fit {
                most: match (bf16, offload) {
                    (Some(false), _) => Keep::F32,
                    (_, Some(false)) => Keep::Bf16,
                    _ => Keep::Bf16Host,
                },
            },
            (checkpoint, keep) => Asked::Fixed {
                checkpoint: checkpoint.unwrap_or(true),
                keep,
            },
        })
    }
}

/// What the checkpointing flags ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Asked {
    /// Exactly this.
    Fixed { checkpoint: bool, keep: Keep },
    /// nibble's choice: checkpointing only when a step needs it, kept in the first of `Keep::ALL`
    /// that fits, up to `most`.
    Fit { most: Keep },
}

pub fn apply(graph: &Graph, keep: Keep) -> Graph {
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
    let kept = match keep {
        Keep::F32 => HashMap::new(),
        Keep::Bf16 | Keep::Bf16Host => block_inputs(graph),
    };
    // Where each kept buffer's forward writes end, and its bf16 copy once packed.
    let mut last_write: HashMap<BufId, usize> = HashMap::new();
    for (i, node) in graph
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| !n.stage.backward)
    {
        for &o in &node.outputs {
            if kept.values().any(|bufs| bufs.contains(&o)) {
                last_write.insert(o, i);
            }
        }
    }
    let mut packed: HashMap<BufId, BufId> = HashMap::new();
    // Per block, its kept inputs restored to f32 for its recomputation and backward.
    let mut restored: HashMap<usize, HashMap<BufId, BufId>> = HashMap::new();
    let mut remap: HashMap<BufId, BufId> = HashMap::new();
    let mut recomputed: HashSet<usize> = HashSet::new();
    for (i, node) in graph.nodes.iter().enumerate() {
        if let Some(block) = node.stage.block.filter(|_| node.stage.backward)
            && kept.contains_key(&block)
            && !restored.contains_key(&block)
        {
            let map = restore(&kept[&block], &packed, block, &mut out, keep);
            restored.insert(block, map);
        }
        if node.stage.backward {
            let needs: Vec<usize> = node
                .reads()
                .filter_map(|b| owner.get(&b).copied())
                .filter(|b| !recomputed.contains(b))
                .collect();
            for block in needs {
                if recomputed.insert(block) {
                    let no_restore = HashMap::new();
                    recompute(
                        graph,
                        (&forward[&block], &produced[&block]),
                        &graph.nodes[i..],
                        &mut out,
                        (&mut remap, restored.get(&block).unwrap_or(&no_restore)),
                    );
                }
            }
            let mut node = node.clone();
            let own = node.stage.block.and_then(|b| restored.get(&b));
            for b in node.inputs.iter_mut().chain(node.outputs.iter_mut()) {
                if let Some(&r) = remap.get(b).or_else(|| own.and_then(|m| m.get(b))) {
                    *b = r;
                }
            }
            out.nodes.push(node);
        } else {
            out.nodes.push(node.clone());
            for &o in &node.outputs {
                if last_write.get(&o) == Some(&i) {
                    let mut words = pack(graph, o, node.stage, &mut out);
                    if keep == Keep::Bf16Host {
                        words = copy_whole(words, Role::Offloaded, node.stage, &mut out);
                    }
                    packed.insert(o, words);
                }
            }
        }
    }
    debug_assert!(blocks.iter().all(|b| forward.contains_key(b)));
    out
}

/// Per block, the buffers its nodes (forward and backward) read that the forward computed outside
/// it: its checkpoints.
fn block_inputs(graph: &Graph) -> HashMap<usize, Vec<BufId>> {
    let mut writer: HashMap<BufId, Option<usize>> = HashMap::new();
    for node in graph.nodes.iter().filter(|n| !n.stage.backward) {
        for &o in &node.outputs {
            if graph.bufs[o].role == Role::Activation {
                writer.entry(o).or_insert(node.stage.block);
            }
        }
    }
    let mut inputs: HashMap<usize, Vec<BufId>> = HashMap::new();
    for node in &graph.nodes {
        let Some(block) = node.stage.block else {
            continue;
        };
        for b in node.reads() {
            let outside = writer.get(&b).is_some_and(|w| *w != Some(block));
            let list = inputs.entry(block).or_default();
            if outside && !list.contains(&b) {
                list.push(b);
            }
        }
    }
    inputs
}

/// Appends the packing of `buf` into a new buffer of bf16 pairs, which it returns.
fn pack(graph: &Graph, buf: BufId, stage: Stage, out: &mut Graph) -> BufId {
    let desc = &graph.bufs[buf];
    out.bufs.push(BufDesc {
        len: desc.len.div_ceil(2),
        dtype: Dtype::U32,
        role: Role::Activation,
        name: format!("{} (bf16)", desc.name),
    });
    let words = out.bufs.len() - 1;
    out.nodes.push(Node {
        op: Op::PackBf16,
        inputs: vec![buf],
        outputs: vec![words],
        accumulate: false,
        stage,
    });
    words
}

/// Appends a copy of all of `buf` into a new buffer of `role` (host memory or back), which it returns.
fn copy_whole(buf: BufId, role: Role, stage: Stage, out: &mut Graph) -> BufId {
    let mut desc = out.bufs[buf].clone();
    desc.name = match role {
        Role::Offloaded => format!("{} (host)", desc.name),
        _ => format!("{} (back from the host)", desc.name),
    };
    desc.role = role;
    let len = desc.len;
    out.bufs.push(desc);
    let copy = out.bufs.len() - 1;
    out.nodes.push(Node {
        op: Op::CopyRows {
            dim: len,
            from: 0,
            to: 0,
            rows: 1,
        },
        inputs: vec![buf],
        outputs: vec![copy],
        accumulate: false,
        stage,
    });
    copy
}

/// Appends the unpacking of `block`'s kept inputs into fresh buffers (first copied back to the device
/// when kept on the host): the map to them.
fn restore(
    inputs: &[BufId],
    packed: &HashMap<BufId, BufId>,
    block: usize,
    out: &mut Graph,
    keep: Keep,
) -> HashMap<BufId, BufId> {
    let stage = Stage {
        block: Some(block),
        backward: true,
    };
    let mut map = HashMap::new();
    for &buf in inputs {
        let Some(&kept) = packed.get(&buf) else {
            continue;
        };
        let words = match keep {
            Keep::Bf16Host => copy_whole(kept, Role::Activation, stage, out),
            _ => kept,
        };
        let mut desc = out.bufs[buf].clone();
        desc.name = format!("{} (restored)", desc.name);
        out.bufs.push(desc);
        let restored = out.bufs.len() - 1;
        out.nodes.push(Node {
            op: Op::UnpackBf16,
            inputs: vec![words],
            outputs: vec![restored],
            accumulate: false,
            stage,
        });
        map.insert(buf, restored);
    }
    map
}

/// Appends the block's forward nodes that produce something `rest` (the backward from here on) reads,
/// with every buffer the block produced replaced by a fresh copy and its kept inputs by their
/// restored copies.
fn recompute(
    graph: &Graph,
    (nodes, produced): (&[&Node], &HashSet<BufId>),
    rest: &[Node],
    out: &mut Graph,
    (remap, restored): (&mut HashMap<BufId, BufId>, &HashMap<BufId, BufId>),
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
        for b in node.inputs.iter_mut() {
            if let Some(&r) = restored.get(b) {
                *b = r;
            }
        }
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

#[cfg(test)]
mod tests {
    use super::{Asked, Keep};

    /// The three flags: a `true` asks for exactly that kind, a `false` alone narrows nibble's choice,
    /// contradictions are refused naming the flags.
    #[test]
    fn checkpoint_flags_resolve_to_what_they_ask() {
        let fixed = |checkpoint, keep| Ok(Asked::Fixed { checkpoint, keep });
        let fit = |most| Ok(Asked::Fit { most });
        let cases = [
            ((None, None, None), fit(Keep::Bf16Host)),
            ((None, None, Some(false)), fit(Keep::Bf16)),
            ((None, Some(false), None), fit(Keep::F32)),
            ((None, Some(false), Some(false)), fit(Keep::F32)),
            ((Some(true), None, None), fixed(true, Keep::F32)),
            ((Some(false), None, None), fixed(false, Keep::F32)),
            (
                (Some(false), Some(false), Some(false)),
                fixed(false, Keep::F32),
            ),
            ((Some(true), None, Some(false)), fixed(true, Keep::F32)),
            ((None, Some(true), None), fixed(true, Keep::Bf16)),
            ((None, Some(true), Some(false)), fixed(true, Keep::Bf16)),
            ((None, None, Some(true)), fixed(true, Keep::Bf16Host)),
            (
                (Some(true), Some(true), Some(true)),
                fixed(true, Keep::Bf16Host),
            ),
        ];
        for ((checkpointing, bf16, offload), expected) in cases {
            let got = Keep::from_flags(checkpointing, bf16, offload);
            assert_eq!(got, expected, "{checkpointing:?} {bf16:?} {offload:?}");
        }
        let refused = [
            (
                Some(false),
                Some(true),
                None,
                "--bf16-checkpoints is a kind",
            ),
            (
                Some(false),
                None,
                Some(true),
                "--offload-checkpoints is a kind",
            ),
            (
                None,
                Some(false),
                Some(true),
                "drop --bf16-checkpoints false",
            ),
        ];
        for (checkpointing, bf16, offload, says) in refused {
            let err = Keep::from_flags(checkpointing, bf16, offload).unwrap_err();
            assert!(err.contains(says), "{err}");
        }
    }
}
