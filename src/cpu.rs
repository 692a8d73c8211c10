//! Training sequences (ids, targets, packed examples) and what a step over one returns; the CPU
//! executor's entry points (`exec::cpu`) re-exported where callers have always found them.

use crate::error::{Error, Result};
use crate::ops::Precision;

/// One training sequence: token ids and, for each position, the token it must predict (None: no loss).
/// A packed sequence holds several examples: `starts` lists where each begins; attention stays inside
/// each example and positions (RoPE) restart at each start.
#[derive(Clone, Debug, PartialEq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    pub targets: Vec<Option<u32>>,
    pub starts: Vec<u32>,
    /// Whether the first token carries a label (TRL's labels[0]): nothing predicts it, but wrapped
    /// packing, which joins examples end to end, has the token before it predict it.
    pub first_labelled: bool,
}

impl Sequence {
    /// Causal-LM targets as transformers derives them from `labels` (shifted by one; -100 ignored):
    /// every next token is a target.
    pub fn all_tokens(ids: Vec<u32>) -> Self {
        let targets = (0..ids.len()).map(|t| ids.get(t + 1).copied()).collect();
        Sequence {
            ids,
            targets,
            starts: vec![0],
            first_labelled: true,
        }
    }

    /// Whether the sequence holds more than one example.
    pub fn is_packed(&self) -> bool {
        self.starts.len() > 1
    }

    /// For each token, the first position it may attend to: the start of its example.
    pub fn segments(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.ids.len());
        for (i, &start) in self.starts.iter().enumerate() {
            let end = self
                .starts
                .get(i + 1)
                .map_or(self.ids.len(), |&e| e as usize);
            out.extend(std::iter::repeat_n(start, end - start as usize));
        }
        out
    }

    /// Each token's position inside its own example.
    pub fn positions(&self) -> Vec<u32> {
        self.segments()
            .iter()
            .enumerate()
            .map(|(t, &s)| t as u32 - s)
            .collect()
    }
}

/// How many examples TRL packs together at most: `datasets.map` hands its packing a batch of 1,000 rows
/// at a time, and each batch is packed on its own.
const PACKING_BATCH: usize = 1000;

/// How `--packing` puts examples into sequences (TRL's `packing_strategy`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PackingStrategy {
    /// Best fit decreasing: whole examples (cut to the sequence length) into the fullest sequence with
    /// room; attention and positions stay inside each.
    #[default]
    Bfd,
    /// As bfd, an example longer than the sequence length split into pieces of it (the last shorter),
    /// each packed as an example of its own: no token is cut off.
    #[value(name = "bfd_split", alias = "bfd-split")]
    BfdSplit,
    /// The examples end to end, cut every sequence length: attention, positions and the loss run across
    /// example boundaries, as in pretraining.
    Wrapped,
}

serde_as_value_enum!(PackingStrategy);

/// Packs examples into sequences of at most `max_len` tokens as TRL's SFTTrainer packs them (its
/// default "bfd" strategy): `pack_with` of `PackingStrategy::Bfd`.
pub fn pack(sequences: Vec<Sequence>, max_len: usize) -> Vec<Sequence> {
    pack_with(sequences, max_len, PackingStrategy::Bfd)
}

/// Packs examples into sequences of at most `max_len` tokens as TRL's `pack_dataset` does, within each
/// batch of `PACKING_BATCH` examples in data order. bfd and bfd_split: best fit decreasing, the longest
/// piece first, each into the bin with the least room that holds it (of equal ones, the first to have
/// that room), a new bin where none does; each piece's last token predicts nothing, so no loss crosses
/// from one into the next (TRL's padding-free rows label no sequence start). wrapped: the batch's
/// tokens end to end, every `max_len` a new sequence of one example, each token predicting the next
/// wherever that one carries a label.
pub fn pack_with(
    sequences: Vec<Sequence>,
    max_len: usize,
    strategy: PackingStrategy,
) -> Vec<Sequence> {
    let mut packed = Vec::new();
    for batch in sequences.chunks(PACKING_BATCH) {
        match strategy {
            PackingStrategy::Wrapped => packed.extend(wrap(batch, max_len)),
            PackingStrategy::Bfd | PackingStrategy::BfdSplit => {
                let split = strategy == PackingStrategy::BfdSplit;
                let pieces: Vec<Sequence> = batch
                    .iter()
                    .flat_map(|s| {
                        let ends = match split {
                            true => s.ids.len().div_ceil(max_len.max(1)),
                            false => 1,
                        };
                        (0..ends).map(move |k| {
                            piece(s, k * max_len, ((k + 1) * max_len).min(s.ids.len()))
                        })
                    })
                    .collect();
                packed.extend(best_fit_decreasing(&pieces, max_len));
            }
        }
    }
    packed
}

/// Tokens a..b of `s` as an example of their own: the last predicts nothing.
fn piece(s: &Sequence, a: usize, b: usize) -> Sequence {
    let mut targets = s.targets[a..b].to_vec();
    if let Some(last) = targets.last_mut() {
        *last = None;
    }
    Sequence {
        ids: s.ids[a..b].to_vec(),
        targets,
        starts: vec![0],
        first_labelled: false,
    }
}

/// Bins of pieces of at most `max_len` tokens each, best fit decreasing.
fn best_fit_decreasing(pieces: &[Sequence], max_len: usize) -> Vec<Sequence> {
    let mut order: Vec<usize> = (0..pieces.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(pieces[i].ids.len()));
    let mut bins: Vec<Vec<usize>> = Vec::new();
    // Bins by the room they have left, each room's in the order they came to it.
    let mut by_room: std::collections::BTreeMap<usize, std::collections::VecDeque<usize>> =
        Default::default();
    for i in order {
        let n = pieces[i].ids.len();
        let fits = by_room.range_mut(n..).next().map(|(&room, bins)| {
            (
                room,
                bins.pop_front().expect("rooms without bins are removed"),
            )
        });
        let (room, bin) = match fits {
            Some((room, bin)) => {
                if by_room[&room].is_empty() {
                    by_room.remove(&room);
                }
                (room, bin)
            }
            None => {
                bins.push(Vec::new());
                (max_len, bins.len() - 1)
            }
        };
        bins[bin].push(i);
        let left = room.saturating_sub(n);
        if left > 0 {
            by_room.entry(left).or_default().push_back(bin);
        }
    }
    bins.into_iter()
        .map(|bin| {
            let mut packed = Sequence {
                ids: Vec::new(),
                targets: Vec::new(),
                starts: Vec::new(),
                first_labelled: false,
            };
            for i in bin {
                packed.starts.push(packed.ids.len() as u32);
                packed.ids.extend_from_slice(&pieces[i].ids);
                packed.targets.extend_from_slice(&pieces[i].targets);
            }
            packed
        })
        .collect()
}

/// The examples end to end, cut every `max_len` tokens (TRL's "wrapped").
fn wrap(batch: &[Sequence], max_len: usize) -> Vec<Sequence> {
    // Each token with whether it carries a label: an example's first by `first_labelled`, the others
    // by the target of the token before.
    let mut tokens: Vec<(u32, bool)> = Vec::new();
    for s in batch {
        for (t, &id) in s.ids.iter().enumerate() {
            let labelled = match t {
                0 => s.first_labelled,
                _ => s.targets[t - 1].is_some(),
            };
            tokens.push((id, labelled));
        }
    }
    tokens
        .chunks(max_len.max(1))
        .map(|row| {
            let ids: Vec<u32> = row.iter().map(|&(id, _)| id).collect();
            let targets = (0..row.len())
                .map(|t| row.get(t + 1).filter(|next| next.1).map(|next| next.0))
                .collect();
            Sequence {
                ids,
                targets,
                starts: vec![0],
                first_labelled: row[0].1,
            }
        })
        .collect()
}

impl Sequence {
    /// Checks that every id and target lies inside a vocabulary of `vocab` tokens.
    pub fn check(&self, vocab: usize) -> Result<()> {
        if self.ids.len() != self.targets.len() {
            return Err(Error::Invalid(
                "a sequence needs one target slot per token".into(),
            ));
        }
        let ordered = self.starts.first() == Some(&0)
            && self.starts.windows(2).all(|w| w[0] < w[1])
            && self
                .starts
                .last()
                .is_some_and(|&s| (s as usize) < self.ids.len().max(1));
        if !ordered {
            return Err(Error::Invalid(
                "a sequence's example starts must begin at 0 and increase inside it".into(),
            ));
        }
        check_tokens(&self.ids, vocab)?;
        match self
            .targets
            .iter()
            .flatten()
            .find(|&&t| t as usize >= vocab)
        {
            Some(bad) => Err(Error::Invalid(format!(
                "target token {bad} is outside the model's vocabulary of {vocab}"
            ))),
            None => Ok(()),
        }
    }

    pub fn target_count(&self) -> usize {
        self.targets.iter().filter(|t| t.is_some()).count()
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepLoss {
    /// Σ cross-entropy over the sequence's targets.
    pub loss_sum: f64,
    /// Σ cross-entropy weighted by each label's probability (`LossType::Dft`'s loss).
    pub dft_sum: f64,
    pub targets: usize,
    /// Σ entropy of the predicted distributions at the targets (nats), and how many targets were the
    /// most likely token: what TRL logs as `entropy` and `mean_token_accuracy`.
    pub entropy_sum: f64,
    pub correct: usize,
}

impl StepLoss {
    /// The summed loss as `loss_type` counts it.
    pub fn sum_of(&self, loss_type: crate::ops::cross_entropy::LossType) -> f64 {
        match loss_type {
            crate::ops::cross_entropy::LossType::Nll => self.loss_sum,
            crate::ops::cross_entropy::LossType::Dft => self.dft_sum,
        }
    }

    /// The sums over a step's `losses` output (a `TokenLoss` row per target).
    pub fn of_rows(rows: &[f32]) -> Self {
        use crate::ops::cross_entropy::{LossType, TokenLoss};
        let mut total = StepLoss::default();
        for t in rows.chunks_exact(TokenLoss::WIDTH).map(TokenLoss::from_row) {
            total += StepLoss {
                loss_sum: t.loss as f64,
                dft_sum: LossType::Dft.weight(t.loss as f64) * t.loss as f64,
                targets: 1,
                entropy_sum: t.entropy as f64,
                correct: usize::from(t.top1),
            };
        }
        total
    }
}

impl std::ops::AddAssign for StepLoss {
    fn add_assign(&mut self, other: StepLoss) {
        self.loss_sum += other.loss_sum;
        self.dft_sum += other.dft_sum;
        self.targets += other.targets;
        self.entropy_sum += other.entropy_sum;
        self.correct += other.correct;
    }
}

/// Checks that every token id lies inside a vocabulary of `vocab` tokens.
pub fn check_tokens(ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(id) => Err(Error::Invalid(format!(
            "token id {id} is outside the model's vocabulary of {vocab}"
        ))),
        None => Ok(()),
    }
}

/// How a training step runs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepOptions {
    /// The gradients computed are those of grad_scale · Σ loss.
    pub grad_scale: f32,
    /// Keep only each decoder layer's input in the forward and recompute the layer in the backward.
    pub checkpoint: bool,
    /// How those inputs are kept.
    pub checkpoints: crate::graph::checkpoint::Keep,
    /// Arithmetic of the frozen-weight products.
    pub precision: Precision,
    /// How each token's loss counts.
    pub loss_type: crate::ops::cross_entropy::LossType,
    /// NEFTune: the half-width of the noise on the embeddings in training, drawn from the dropout seed
    /// (None: no noise).
    pub noise: Option<f32>,
    /// Where DoRA's factors come from (`forward_backward_keeping` keeps them between the micro-batches
    /// of an optimizer step, over which they do not change).
    pub dora_factors: crate::models::decoder::FactorSource,
}

pub use crate::exec::cpu::{
    KvCache, decode, forward_backward, forward_backward_keeping, forward_backward_with, logits,
};
