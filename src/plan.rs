//! Peak memory of a training step, computed from the model's shapes before anything runs: what tells a
//! user whether a model fits their machine. The activations are those of the very graph the executors
//! run (`models::decoder`), each buffer alive from its first write to its last use, at the step's worst
//! node, plus that node's kernel temporaries.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::lora::resolve_targets;
use crate::model::planned_weight_bytes;
use crate::models::decoder::{self, LoraSpec, StepShape};
use crate::quant::QuantSpec;
use serde::Serialize;

#[derive(Clone, Debug, PartialEq)]
pub struct PlanInput {
    pub tokens: usize,
    /// None: dense 16-bit weights.
    pub quant: Option<QuantSpec>,
    pub lora_rank: usize,
    /// PEFT's `rank_pattern`: (module expression, rank) pairs, the first that names a module giving
    /// its rank (`lora::Patterns`).
    pub lora_rank_pattern: Vec<(String, usize)>,
    /// PEFT's `target_modules` (`all-linear`, or module names).
    pub lora_targets: Vec<String>,
    /// PEFT's `target_parameters` (a mixture of experts' routers and stacked experts, by name),
    /// beside those PEFT converts `lora_targets` into.
    pub lora_target_parameters: Vec<String>,
    pub lora_dropout: bool,
    /// DoRA: a magnitude per output, and each adapted linear's rescaled term kept for the backward.
    pub dora: bool,
    pub checkpoint: bool,
    /// How checkpointing keeps each layer's input.
    pub checkpoints: crate::graph::checkpoint::Keep,
    /// How many tokens' rows of the tables train (`--trainable-tokens`).
    pub trainable_tokens: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    /// The frozen weights the executor binds (on the GPU executor: in device memory).
    pub weights: u64,
    /// Weights the GPU executor keeps in host memory, uploading only the rows a step reads: an untied
    /// embedding. The CPU executor holds them with the rest (`cpu_total`).
    pub host_weights: u64,
    /// The CPU executor's own copy of the tables whose token rows train (`--trainable-tokens`), in
    /// host memory (in `cpu_total`). The GPU executor writes the rows into its device tables, and
    /// copies only a table it keeps on the host (`host_weights`).
    pub token_tables: u64,
    /// LoRA matrices (and trained token rows), their gradients and AdamW's two moments (f32 each).
    pub lora_and_optimizer: u64,
    pub lora_parameters: u64,
    /// The step's buffers alive at its worst node (activations kept for the backward and the
    /// temporaries of that moment).
    pub activations: u64,
    /// The kernel temporaries of that node (weight tiles, attention's per-head shares, a vocabulary
    /// chunk).
    pub workspace: u64,
    /// What the GPU executor holds for the step: the device buffers its activations share
    /// (`graph::pool::place`: more than the live bytes at the worst node, as whole buffers are
    /// shared, not bytes), the results it reads back and the largest node's kernel temporaries.
    pub device_step: u64,
    /// Offloaded checkpoints, in host memory on the GPU executor (not in `total`).
    pub host_activations: u64,
    /// What a GPU needs: the weights, LoRA and AdamW state, and `device_step`.
    pub total: u64,
}

const F32: u64 = 4;

/// The graph a training step of `p` runs: every position labelled (the most a step of that length
/// needs), LoRA on the chosen linears of every layer.
pub fn step_graph(c: &ModelConfig, p: &PlanInput) -> Result<Graph> {
    let pairs = planned_pairs(c, p)?;
    let mut lora = LoraSpec::uniform(
        pairs.iter().map(|pair| pair.path.clone()),
        p.lora_rank,
        if p.lora_dropout { 0.1 } else { 0.0 },
    );
    for pair in &pairs {
        let adapted = lora.targets.get_mut(&pair.path).expect("added");
        adapted.rank = pair.rank;
        // Parameters are adapted without DoRA (PEFT refuses it there).
        adapted.dora = p.dora && pair.experts == 0;
    }
    if p.trainable_tokens > 0 {
        let ids: Vec<u32> = (0..p.trainable_tokens as u32).collect();
        lora.tokens = c
            .token_row_modules()
            .into_iter()
            .map(|path| decoder::TrainedRows {
                path,
                token_ids: ids.clone(),
            })
            .collect();
    }
    let shape = StepShape {
        tokens: p.tokens,
        positions: p.tokens,
        packed: false,
        backward: true,
        dropout: p.lora_dropout,
        // One elementwise pass over the embeddings in place: no memory of its own.
        noise: false,
        checkpoint: p.checkpoint,
        logits: false,
        decode_after: None,
        mlp_chunk: decoder::MLP_CHUNK,
        checkpoints: p.checkpoints,
    };
    Ok(decoder::build(c, Some(&lora), shape))
}

impl Plan {
    /// A step's plan from its parts: the weights' bytes, the (out, in) shapes of the adapted linears
    /// at LoRA `rank` (each matrix with its gradient and two f32 moments), and the step's graph.
    /// `adapted`: each pair's (out, in, rows of its A, whether DoRA gives it a magnitude).
    pub fn new(
        weights: u64,
        adapted: impl Iterator<Item = (usize, usize, usize, bool)>,
        step: &Graph,
    ) -> Plan {
        let lora_parameters: u64 = adapted
            .map(|(out, inp, rank, dora)| (rank * (inp + out) + if dora { out } else { 0 }) as u64)
            .sum();
        let lora_and_optimizer = 4 * F32 * lora_parameters;
        let memory = step.memory();
        let device_step = crate::graph::pool::device_step_bytes(step);
        Plan {
            weights,
            host_weights: 0,
            token_tables: 0,
            lora_and_optimizer,
            lora_parameters,
            activations: memory.buffers,
            workspace: memory.temporaries,
            device_step,
            host_activations: memory.host,
            total: weights + lora_and_optimizer + device_step,
        }
    }

    /// What the CPU executor holds: everything in host memory (offloaded checkpoints counted at
    /// their own peak, which bounds the sum).
    pub fn cpu_total(&self) -> u64 {
        self.weights
            + self.host_weights
            + self.token_tables
            + self.lora_and_optimizer
            + self.activations
            + self.workspace
            + self.host_activations
    }
}

/// A pair of LoRA matrices a plan counts: its module path, shape and rank, and the experts
/// stacked in it (0 for a linear, whose pair is not a parameter's).
struct PlannedPair {
    path: String,
    out: usize,
    inp: usize,
    rank: usize,
    experts: usize,
}

/// The pairs training adapts for `p`'s targets at its rank, as `LoraAdapter::init` resolves them
/// (a mixture of experts' gate_up_proj at twice the rank where PEFT fuses two names into it).
fn planned_pairs(c: &ModelConfig, p: &PlanInput) -> Result<Vec<PlannedPair>> {
    let (linears, parameters) = resolve_targets(c, &p.lora_targets, &p.lora_target_parameters)?;
    let rank_pattern = crate::lora::Patterns::new(p.lora_rank_pattern.clone())
        .map_err(|e| Error::Invalid(format!("rank pattern: {e}")))?;
    let config = crate::lora::LoraConfig {
        r: p.lora_rank,
        rank_pattern,
        dropout: 0.0,
        targets: p.lora_targets.clone(),
        target_parameters: p.lora_target_parameters.clone(),
        ..Default::default()
    }
    .converted_for(c)?;
    let linears = linears
        .into_iter()
        .map(|(path, out, inp)| (path, out, inp, 0));
    let parameters = parameters.into_iter().map(|param| {
        let path = crate::lora::parameter_path(&param.name).to_string();
        (path, param.out, param.inp, param.experts)
    });
    Ok(linears
        .chain(parameters)
        .map(|(path, out, inp, experts)| PlannedPair {
            rank: config.rank_of(&path),
            path,
            out,
            inp,
            experts,
        })
        .collect())
}

/// The plan of a training step; an error when a LoRA target names no linear layer of the model.
pub fn plan(c: &ModelConfig, p: &PlanInput) -> Result<Plan> {
    let adapted = planned_pairs(c, p)?;
    // Tables stay 16-bit, as `planned_weight_bytes` counts them.
    let table_bytes = |names: &[String]| -> u64 {
        c.expected_tensors()
            .iter()
            .filter(|t| names.contains(&t.name))
            .map(|t| 2 * t.shape.iter().product::<usize>() as u64)
            .sum()
    };
    let on_host = decoder::host_tables(c);
    let host_weights = table_bytes(&on_host);
    let row_tables: Vec<String> = match p.trainable_tokens {
        0 => Vec::new(),
        _ => c
            .token_row_modules()
            .iter()
            .filter_map(|path| c.token_rows_table(path))
            .collect(),
    };
    let mut plan = Plan::new(
        planned_weight_bytes(c, p.quant) - host_weights,
        adapted.iter().map(|a| {
            (
                a.out,
                a.inp,
                a.rank * a.experts.max(1),
                p.dora && a.experts == 0,
            )
        }),
        &step_graph(c, p)?,
    );
    let rows = (p.trainable_tokens * row_tables.len() * c.hidden_size) as u64;
    plan.lora_parameters += rows;
    plan.lora_and_optimizer += 4 * F32 * rows;
    plan.total += 4 * F32 * rows;
    plan.host_weights = host_weights;
    plan.token_tables = table_bytes(&row_tables);
    Ok(plan)
}

/// The longest sequence (up to `MAX_TOKENS` and the positions the model places, which training cuts
/// sequences to) whose step, with `p`'s other options, fits in `budget` bytes, with its plan; None when not even one token fits. A step's memory grows with its length:
/// doubling finds a length over the budget, then halving the interval finds the longest that fits
/// (graphs at most twice that long are built, not one of `MAX_TOKENS` for a card's budget).
pub fn longest_sequence(
    c: &ModelConfig,
    p: &PlanInput,
    budget: u64,
) -> Result<Option<(usize, Plan)>> {
    let at = |tokens: usize| {
        plan(
            c,
            &PlanInput {
                tokens,
                ..p.clone()
            },
        )
    };
    let most = crate::train::settings::MAX_TOKENS.min(c.trained_positions().max(1));
    let first = at(1)?;
    if first.total > budget {
        return Ok(None);
    }
    let (mut fits, mut best) = (1, first);
    let mut over = most + 1;
    let mut probe = 1024.min(most);
    while probe > fits {
        let planned = at(probe)?;
        if planned.total > budget {
            over = probe;
            break;
        }
        (fits, best) = (probe, planned);
        probe = (probe * 2).min(most);
    }
    while over - fits > 1 {
        let mid = fits + (over - fits) / 2;
        let planned = at(mid)?;
        if planned.total <= budget {
            (fits, best) = (mid, planned);
        } else {
            over = mid;
        }
    }
    Ok(Some((fits, best)))
}
