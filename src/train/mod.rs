//! Supervised fine-tuning of LoRA adapters: the optimisation semantics of transformers + peft, so that
//! results are comparable. One optimizer step sees batch_size · grad_accum examples (fewer at an epoch's
//! end, as transformers' Trainer steps on the epoch's last batches), and its loss is the sum of token
//! cross-entropy over all their label tokens divided by the count of those tokens. Gradients are
//! clipped by global norm, AdamW updates the adapters, and the learning rate follows transformers'
//! schedules.

#[cfg(not(target_arch = "wasm32"))]
pub mod feature_cache;
pub mod flux2;
#[cfg(not(target_arch = "wasm32"))]
pub mod folder;
pub mod run;
pub mod schedule;
pub mod settings;
pub mod tensorboard;
mod timestep_weights;
#[cfg(not(target_arch = "wasm32"))]
pub mod trl_config;

use crate::cpu::{self, Sequence, StepLoss, StepOptions};
use crate::data::{Example, Turns};
use crate::error::{Error, Result};
use crate::exec;
use crate::exec::gpu::SequenceOptions;
use crate::gpu::Gpu;
use crate::gpu::train::{BaseModel, GpuTrainState};
use crate::graph::StepInputs;
use crate::lora::{LoraAdapter, LoraConfig, factor_key};
use crate::model::Model;
use crate::models::decoder::FactorSource;
use crate::models::optimizer;
use crate::ops::Precision;
use crate::ops::adamw::AdamWParams;
pub use crate::ops::cross_entropy::LossType;
use crate::rng::Rng;
use crate::shared::Shared;
use crate::tokenizer::{ByteRange, ChatTokenizer, Message, TemplateArgs};
pub use schedule::{Schedule, ScheduleKwargs};
use serde_json::json;
use std::path::Path;
#[cfg(not(target_arch = "wasm32"))]
use std::time::Instant;
#[cfg(target_arch = "wasm32")]
use web_time::Instant;

serde_as_value_enum!(LossOn, Truncation);

/// Which end of an example longer than `--max-length` is kept (TRL's `truncation_mode`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Truncation {
    #[default]
    #[value(name = "keep_start", alias = "keep-start")]
    KeepStart,
    /// The end: for conversations whose answers come last.
    #[value(name = "keep_end", alias = "keep-end")]
    KeepEnd,
}

/// How an example is cut to fit: at most `max_length` tokens, keeping `keep`'s end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut {
    pub max_length: usize,
    pub keep: Truncation,
}

impl Cut {
    /// The first `max_length` tokens.
    pub fn start(max_length: usize) -> Cut {
        Cut {
            max_length,
            keep: Truncation::KeepStart,
        }
    }
}

/// Which tokens carry loss.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossOn {
    /// TRL's default: every token for messages and text rows, the completion for prompt/completion rows.
    Default,
    All,
    Completion,
    /// The assistant turns of conversational rows.
    Assistant,
}

#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub lora: LoraConfig,
    /// Token ids whose embedding rows train beside the LoRA matrices, and their output projection
    /// rows (a tied model's are the same rows), as PEFT's `trainable_token_indices`.
    pub trainable_tokens: Vec<u32>,
    pub lr: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub schedule: Schedule,
    /// The schedule's own parameters (transformers' `lr_scheduler_kwargs`).
    pub schedule_kwargs: ScheduleKwargs,
    /// AdamW's β₁, β₂ and ε (transformers' `adam_beta1`, `adam_beta2`, `adam_epsilon`).
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub warmup_steps: usize,
    /// Warmup as a fraction of all steps (rounded up, as transformers does); `warmup_steps` wins when set.
    pub warmup_ratio: f64,
    /// Passes over the data; a fraction stops within the last (transformers' `num_train_epochs`:
    /// ceil(epochs · steps per epoch) steps).
    pub epochs: f64,
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_length: usize,
    /// Which end of a longer example is kept.
    pub truncation: Truncation,
    /// The column of text rows (TRL's `dataset_text_field`).
    pub text_field: String,
    pub seed: u64,
    pub shuffle: bool,
    pub loss_on: LossOn,
    /// How each token's loss counts (TRL's `loss_type`).
    pub loss_type: LossType,
    /// NEFTune's α: noise uniform in ±α/√(L·hidden) added to the embeddings in training, L the
    /// micro-batch row's length (transformers' `neftune_noise_alpha`). None: no noise.
    pub neftune_noise_alpha: Option<f64>,
    pub checkpoint: bool,
    /// How checkpointing keeps each layer's input (`--bf16-checkpoints`).
    pub checkpoints: crate::graph::checkpoint::Keep,
    pub precision: Precision,
}

impl TrainConfig {
    /// The examples of a whole optimizer step.
    pub fn examples_per_step(&self) -> usize {
        self.batch_size.saturating_mul(self.grad_accum)
    }

    /// The optimizer steps of one epoch over `examples` (the last takes what the epoch has left).
    pub fn steps_per_epoch(&self, examples: usize) -> usize {
        examples.div_ceil(self.examples_per_step().max(1))
    }

    /// How examples are cut to fit.
    pub fn cut(&self) -> Cut {
        Cut {
            max_length: self.max_length,
            keep: self.truncation,
        }
    }

    /// Whether warmup was asked for under `constant`, which (as transformers') has none.
    pub fn constant_drops_warmup(&self) -> bool {
        self.schedule == Schedule::Constant && (self.warmup_steps > 0 || self.warmup_ratio > 0.0)
    }

    /// Warmup steps of a run of `total_steps`.
    pub fn warmup_for(&self, total_steps: usize) -> usize {
        if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            (self.warmup_ratio * total_steps as f64).ceil() as usize
        }
    }

    /// The scheduled learning rate of optimizer step `step` (0-based) of `total_steps`.
    pub fn lr_at(&self, step: usize, total_steps: usize) -> f64 {
        let warmup = self.warmup_for(total_steps);
        let kwargs = &self.schedule_kwargs;
        self.lr
            * self
                .schedule
                .factor(kwargs, self.lr, step, warmup, total_steps)
    }

    /// AdamW's parameters for optimizer step `step` (0-based) of `total_steps`: the scheduled learning
    /// rate, the configured betas, eps and weight decay.
    pub fn adamw_at(&self, step: usize, total_steps: usize) -> AdamWParams {
        AdamWParams::new(
            self.lr_at(step, total_steps),
            self.adam_beta1,
            self.adam_beta2,
            self.adam_epsilon,
            self.weight_decay,
            step as u64 + 1,
            1.0,
        )
    }
}

impl TrainConfig {
    /// The configuration in words, for the start of a run's log.
    pub fn describe(&self) -> String {
        let lora = &self.lora;
        let steps = match self.max_steps {
            Some(n) => format!(", at most {n} steps"),
            None => String::new(),
        };
        let warmup = match (self.warmup_steps, self.warmup_ratio) {
            (0, 0.0) => "no warmup".to_string(),
            (0, r) => format!("warmup over {r} of the steps"),
            (n, _) => format!("warmup over {n} steps"),
        };
        let checkpointing = match (self.checkpoint, self.checkpoints) {
            (false, _) => "no gradient checkpointing",
            (true, crate::graph::checkpoint::Keep::F32) => "gradient checkpointing",
            (true, crate::graph::checkpoint::Keep::Bf16) => "gradient checkpointing in bf16",
            (true, crate::graph::checkpoint::Keep::Bf16Host) => {
                "gradient checkpointing in bf16, kept in host memory"
            }
        };
        let precision = match self.precision {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Int16 => "int16",
        };
        format!(
            "LoRA r {} alpha {} dropout {}{}{} on {}; lr {} ({} schedule, {warmup}), {} epoch(s){steps}; \
             batch {} x accumulation {}, max length {}, seed {}{}; {checkpointing}; the CPU's \
             products in {precision} (the GPU's in f32)",
            lora.r,
            lora.alpha,
            lora.dropout,
            match (lora.use_rslora, lora.use_dora) {
                (false, false) => "",
                (true, false) => " (rsLoRA)",
                (false, true) => " (DoRA)",
                (true, true) => " (rsLoRA, DoRA)",
            },
            if lora.has_patterns() {
                " (some modules' own, by pattern)"
            } else {
                ""
            },
            lora.targets
                .iter()
                .chain(&lora.target_parameters)
                .cloned()
                .collect::<Vec<_>>()
                .join(","),
            self.lr,
            self.schedule.name(),
            self.epochs,
            self.batch_size,
            self.grad_accum,
            self.max_length,
            self.seed,
            if self.shuffle {
                ""
            } else {
                ", data in file order"
            },
        )
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lora: LoraConfig::default(),
            lr: 2e-4,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            schedule: Schedule::Linear,
            schedule_kwargs: ScheduleKwargs::default(),
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            epochs: 1.0,
            max_steps: None,
            batch_size: 1,
            grad_accum: 1,
            max_length: 1024,
            truncation: Truncation::KeepStart,
            text_field: "text".into(),
            seed: 42,
            shuffle: true,
            loss_on: LossOn::Default,
            loss_type: LossType::Nll,
            neftune_noise_alpha: None,
            trainable_tokens: Vec::new(),
            checkpoint: false,
            checkpoints: crate::graph::checkpoint::Keep::F32,
            precision: Precision::F32,
        }
    }
}

/// One example as token ids and targets, cut to its first `max_length` tokens; returns how many tokens
/// were cut.
pub fn tokenize(
    tok: &ChatTokenizer,
    example: &Example,
    loss_on: LossOn,
    max_length: usize,
) -> Result<(Sequence, usize)> {
    tokenize_cut(tok, example, loss_on, Cut::start(max_length))
}

/// One example as token ids and targets, cut as `cut` says (TRL cuts the ids and their labels alike,
/// after the labels are known); returns how many tokens were cut.
pub fn tokenize_cut(
    tok: &ChatTokenizer,
    example: &Example,
    loss_on: LossOn,
    cut: Cut,
) -> Result<(Sequence, usize)> {
    // Turns wholly beyond the kept start need not be rendered; keeping the end needs them all.
    let max_length = match cut.keep {
        Truncation::KeepStart => cut.max_length,
        Truncation::KeepEnd => usize::MAX,
    };
    let text = crate::data::render(tok, example)?;
    // TRL tokenizes plain text as the tokenizer's `__call__` does, with the special tokens it adds (a
    // BOS); a conversation comes through the template, which writes its own.
    let plain = matches!(
        example,
        Example::Text(_)
            | Example::PromptCompletion {
                prompt: Turns::Text(_),
                ..
            }
    );
    let (ids, offsets) = tok.encode_with_offsets(&text, plain)?;
    // Token ranges that carry loss; None: every token.
    let spans: Option<Vec<(usize, usize)>> = match (example, loss_on) {
        (Example::PromptCompletion { prompt, args, .. }, LossOn::Default | LossOn::Completion) => {
            let prompt_ids = match prompt {
                Turns::Text(p) => tok.encode_text(p)?,
                Turns::Messages(p) => tok.encode(&tok.apply_chat_template_with(p, true, args)?)?,
            };
            Some(vec![(completion_start(tok, &prompt_ids, &ids)?, ids.len())])
        }
        (_, LossOn::Completion) => {
            return Err(Error::Invalid(
                "--loss-on completion needs prompt/completion rows".into(),
            ));
        }
        (Example::Messages(m, args), LossOn::Assistant) => Some(assistant_spans(
            tok,
            m,
            args,
            (&text, &offsets),
            &ids,
            max_length,
        )?),
        (
            Example::PromptCompletion {
                prompt: Turns::Messages(p),
                completion: Turns::Messages(c),
                args,
            },
            LossOn::Assistant,
        ) => {
            // The assistant's tokens within the completion: TRL masks by both (its completion-only
            // loss is on for prompt/completion rows).
            let all: Vec<Message> = p.iter().chain(c).cloned().collect();
            let prompt_ids = tok.encode(&tok.apply_chat_template_with(p, true, args)?)?;
            let start = completion_start(tok, &prompt_ids, &ids)?;
            let spans = assistant_spans(tok, &all, args, (&text, &offsets), &ids, max_length)?;
            Some(
                spans
                    .into_iter()
                    .map(|(a, b)| (a.max(start), b))
                    .filter(|(a, b)| a < b)
                    .collect(),
            )
        }
        (_, LossOn::Assistant) => {
            return Err(Error::Invalid(
                "--loss-on assistant needs conversational rows (messages)".into(),
            ));
        }
        _ => None,
    };
    let mut seq = Sequence::all_tokens(ids);
    if let Some(spans) = spans {
        // Position t predicts token t + 1, which carries loss when it lies in a span.
        let mut carries = vec![false; seq.ids.len() + 1];
        for (a, b) in spans {
            let (a, b) = (a.min(carries.len()), b.min(carries.len()));
            carries[a..b].iter_mut().for_each(|c| *c = true);
        }
        for (t, target) in seq.targets.iter_mut().enumerate() {
            if !carries[t + 1] {
                *target = None;
            }
        }
        seq.first_labelled = carries[0];
    }
    Ok(cut_sequence(seq, cut))
}

/// An example's sequence cut as `cut` says, as TRL cuts its ids and labels alike; returns how many
/// tokens were cut.
pub fn cut_sequence(mut seq: Sequence, cut: Cut) -> (Sequence, usize) {
    let removed = seq.ids.len().saturating_sub(cut.max_length);
    if removed == 0 {
        return (seq, 0);
    }
    match cut.keep {
        Truncation::KeepStart => {
            seq.ids.truncate(cut.max_length);
            seq.targets.truncate(cut.max_length);
            // Its next token is gone.
            if let Some(last) = seq.targets.last_mut() {
                *last = None;
            }
        }
        Truncation::KeepEnd => {
            seq.first_labelled = seq.targets[removed - 1].is_some();
            seq.ids.drain(..removed);
            seq.targets.drain(..removed);
        }
    }
    (seq, removed)
}

/// Where the completion of a prompt/completion row starts in its tokens `ids`: where the prompt's own
/// tokens and them part, as TRL takes it. They part before the prompt's end where a token spans the
/// boundary (a prompt ending in a space) or a chat template renders the prompt alone otherwise; TRL
/// then trains on the prompt's differing end too, and so does nibble, saying so once.
fn completion_start(tok: &ChatTokenizer, prompt_ids: &[u32], ids: &[u32]) -> Result<usize> {
    let common = prompt_ids
        .iter()
        .zip(ids)
        .take_while(|(a, b)| a == b)
        .count();
    static WARNED: std::sync::Once = std::sync::Once::new();
    if common < prompt_ids.len() {
        let differing = tok.decode(&prompt_ids[common..]).unwrap_or_default();
        WARNED.call_once(|| {
            log::warn!(
                "a prompt does not tokenize to the start of its prompt + completion (a token spans the \
                 boundary, or the chat template renders the prompt alone otherwise): its completion's \
                 loss starts where they part, as in TRL, and the prompt's own last tokens ({differing:?}) \
                 are not what the model sees. End prompts on a token boundary (no trailing space) to \
                 keep the two apart. Said once; it may apply to other rows."
            )
        });
    }
    Ok(common)
}

/// How many tokens of `ids` the text `prefix` accounts for; an error when it does not tokenize to a
/// prefix of them (then loss masking cannot tell the parts apart).
fn prefix_tokens(tok: &ChatTokenizer, prefix: &str, ids: &[u32], what: &str) -> Result<usize> {
    let p = tok.encode(prefix)?;
    if !ids.starts_with(&p) {
        return Err(Error::Invalid(format!(
            "{what} does not tokenize to a prefix of the whole example; cannot tell which tokens carry loss"
        )));
    }
    Ok(p.len())
}

/// The token ranges of the assistant turns. A template with `{% generation %}` blocks says what they
/// are: the tokens that overlap a block's text, as transformers' `return_assistant_tokens_mask` (which
/// TRL's `assistant_only_loss` trains on) takes them. Otherwise each runs from the end of the
/// conversation rendered up to that turn with the generation prompt, to the end of it rendered through
/// the turn (its end-of-turn token included). Works with any template that renders earlier turns the same way as the whole conversation;
/// where a turn renders otherwise once later turns follow it (Qwen3 drops the reasoning of the turns
/// before the last question), the turn ends at its end-of-turn token, and where even its start moves (an
/// agent's trace: a call with reasoning, the tool's answer, a new question), the turns are found by their
/// headers (`spans_by_headers`). Turns that start beyond `max_length` are not rendered: they are cut off
/// anyway, and rendering each turn's prefix makes long conversations quadratic.
/// `rendered` is the conversation's text with each of its tokens' byte range.
fn assistant_spans(
    tok: &ChatTokenizer,
    messages: &[Message],
    args: &TemplateArgs,
    rendered: (&str, &[ByteRange]),
    ids: &[u32],
    max_length: usize,
) -> Result<Vec<(usize, usize)>> {
    let template = tok.template_for(args)?;
    if template.marks_generation() {
        return spans_by_marks(template, messages, args, rendered);
    }
    match spans_by_prefixes(tok, messages, args, ids, max_length) {
        Ok(spans) => Ok(spans),
        Err(e) => spans_by_headers(tok, messages, args, ids)?.ok_or(e),
    }
}

/// The runs of tokens of `text` (the conversation as rendered, its tokens at `offsets`) that overlap
/// what the template's `{% generation %}` blocks wrote.
fn spans_by_marks(
    template: &crate::tokenizer::ChatTemplate,
    messages: &[Message],
    args: &TemplateArgs,
    (text, offsets): (&str, &[ByteRange]),
) -> Result<Vec<(usize, usize)>> {
    let (marked_text, marks) = template.render_marked(messages, false, args)?;
    if marked_text != text {
        return Err(Error::Template(
            "the chat template rendered this conversation two ways (does it read the clock?), so its {% generation %} blocks cannot be placed".into(),
        ));
    }
    if marks.is_empty() && messages.iter().any(|m| m.role == "assistant") {
        return Err(Error::Template(
            "--loss-on assistant: the chat template's {% generation %} blocks mark nothing in this conversation, so no token would carry loss".into(),
        ));
    }
    let mut spans: Vec<(usize, usize)> = Vec::new();
    for (t, &(start, end)) in offsets.iter().enumerate() {
        if !marks.iter().any(|&(a, b)| start < b && end > a) {
            continue;
        }
        match spans.last_mut() {
            Some(run) if run.1 == t => run.1 = t + 1,
            _ => spans.push((t, t + 1)),
        }
    }
    Ok(spans)
}

/// The assistant turns of a conversation whose prefixes render otherwise than the whole, found in the
/// whole by structure: the generation prompt (the assistant's header) stands once before each assistant
/// turn and nowhere else, and each turn runs to the end-of-turn token (with what follows it) its own
/// rendering ends with, before the next turn's header. Accepted only where every turn's span then holds
/// the turn's text and the names of the functions it calls; None otherwise.
fn spans_by_headers(
    tok: &ChatTokenizer,
    messages: &[Message],
    args: &TemplateArgs,
    ids: &[u32],
) -> Result<Option<Vec<(usize, usize)>>> {
    let turns: Vec<usize> = (0..messages.len())
        .filter(|&i| messages[i].role == "assistant")
        .collect();
    let Some(&last) = turns.last() else {
        return Ok(Some(Vec::new()));
    };
    // The header: what the generation prompt adds before the last turn; its end: the special token
    // (and what follows it) that the rendering through the last turn ends with.
    let before = tok.encode(&tok.apply_chat_template_with(&messages[..last], false, args)?)?;
    let prompted = tok.encode(&tok.apply_chat_template_with(&messages[..last], true, args)?)?;
    let through = tok.encode(&tok.apply_chat_template_with(&messages[..=last], false, args)?)?;
    let Some(header) = prompted.strip_prefix(&before[..]).filter(|h| !h.is_empty()) else {
        return Ok(None);
    };
    let Some(eot) = through.iter().rposition(|&id| tok.is_special(id)) else {
        return Ok(None);
    };
    let tail = &through[eot + 1..];
    let starts: Vec<usize> = (0..ids.len().saturating_sub(header.len() - 1))
        .filter(|&t| ids[t..].starts_with(header))
        .map(|t| t + header.len())
        .collect();
    if starts.len() != turns.len() {
        return Ok(None);
    }
    let mut spans = Vec::with_capacity(turns.len());
    for (n, (&i, &start)) in turns.iter().zip(&starts).enumerate() {
        // A turn ends before the next one's header (Phi-3.5's eos closes only the conversation).
        let next = starts.get(n + 1).map_or(ids.len(), |&s| s - header.len());
        let Some(k) = ids[start..next].iter().position(|&id| id == through[eot]) else {
            return Ok(None);
        };
        let mut end = start + k + 1;
        if ids[end..].starts_with(tail) {
            end += tail.len();
        }
        let text = tok.decode(&ids[start..end])?;
        let m = &messages[i];
        let content = m.content.as_deref().unwrap_or_default().trim();
        let names = m
            .extra
            .get("tool_calls")
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| c.pointer("/function/name")?.as_str());
        if !text.contains(content) || names.into_iter().any(|n| !text.contains(n)) {
            return Ok(None);
        }
        spans.push((start, end));
    }
    Ok(Some(spans))
}

fn spans_by_prefixes(
    tok: &ChatTokenizer,
    messages: &[Message],
    args: &TemplateArgs,
    ids: &[u32],
    max_length: usize,
) -> Result<Vec<(usize, usize)>> {
    let mut spans = Vec::new();
    let mut reached = 0;
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        if reached >= max_length {
            break;
        }
        let unsplittable = |e: Error| match e {
            Error::Invalid(msg) => Error::Invalid(format!(
                "{msg} (this chat template renders a turn otherwise once later turns follow it): use --loss-on all, or give each assistant turn a row of its own"
            )),
            other => other,
        };
        let what = format!("the conversation before assistant turn {}", i + 1);
        let start = prefix_tokens(
            tok,
            &tok.apply_chat_template_with(&messages[..i], true, args)?,
            ids,
            &what,
        )
        .map_err(unsplittable)?;
        let what = format!("the conversation through assistant turn {}", i + 1);
        let through = tok.apply_chat_template_with(&messages[..=i], false, args)?;
        let end = match prefix_tokens(tok, &through, ids, &what) {
            Ok(end) => end,
            Err(e) => {
                turn_end_by_token(tok, &through, ids, start)?.ok_or_else(|| unsplittable(e))?
            }
        };
        reached = end;
        spans.push((start, end));
    }
    Ok(spans)
}

/// Where the assistant turn that starts at token `start` of `ids` ends, when the conversation rendered
/// through it (`through`) is not a prefix of the whole: a template that renders a turn otherwise once
/// later turns follow it (Qwen3 keeps only the last turn's reasoning). The turn ends at the end-of-turn
/// token its own rendering ends with (its last special token), provided what the whole conversation
/// holds up to there is the end of that rendering (the turn with its leading part dropped), and takes
/// what follows that token in its rendering (a newline) where the whole has it too. None otherwise (a
/// template that closes only the whole conversation with a special token, as Phi-3.5's does).
fn turn_end_by_token(
    tok: &ChatTokenizer,
    through: &str,
    ids: &[u32],
    start: usize,
) -> Result<Option<usize>> {
    let alone = tok.encode(through)?;
    if alone.len() <= start || alone[..start] != ids[..start] {
        return Ok(None);
    }
    let turn = &alone[start..];
    let Some(last_special) = turn.iter().rposition(|&id| tok.is_special(id)) else {
        return Ok(None);
    };
    let (body, tail) = turn.split_at(last_special + 1);
    let Some(k) = ids[start..].iter().position(|&id| id == turn[last_special]) else {
        return Ok(None);
    };
    let end = start + k + 1;
    if !body.ends_with(&ids[start..end]) {
        return Ok(None);
    }
    Ok(Some(match ids[end..].starts_with(tail) {
        true => end + tail.len(),
        false => end,
    }))
}

/// NEFTune's noise half-width for each of `picks`' sequences (None without `alpha`): α/√(L·hidden), L
/// the length of the micro-batch's row as transformers' hook sees it: its longest sequence, to which the
/// others are padded, or, `padding_free` (TRL's best-fit packing), all of them end to end.
pub fn noise_magnitudes(
    alpha: Option<f64>,
    sequences: &[Sequence],
    picks: &[usize],
    (batch_size, padding_free): (usize, bool),
    hidden: usize,
) -> Vec<Option<f32>> {
    let Some(alpha) = alpha else {
        return vec![None; picks.len()];
    };
    picks
        .chunks(batch_size.max(1))
        .flat_map(|micro| {
            let lengths = micro.iter().map(|&i| sequences[i].ids.len());
            let row = match padding_free {
                true => lengths.sum::<usize>(),
                false => lengths.max().unwrap_or(0),
            };
            let magnitude = (alpha / ((row * hidden) as f64).sqrt()) as f32;
            vec![Some(magnitude); micro.len()]
        })
        .collect()
}

/// One optimizer step's record, as written to metrics.jsonl.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRecord {
    pub step: usize,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub tokens_per_s: f64,
    /// How the model's predictions at the labelled tokens went (language models).
    pub predictions: Option<TokenMetrics>,
}

impl StepRecord {
    pub fn to_json(&self) -> serde_json::Value {
        let mut line = json!({"step": self.step, "epoch": self.epoch, "loss": self.loss, "lr": self.lr,
               "grad_norm": self.grad_norm, "tokens": self.tokens, "tokens_per_s": self.tokens_per_s});
        if let Some(p) = &self.predictions {
            line["mean_token_accuracy"] = p.mean_token_accuracy.into();
            line["entropy"] = p.entropy.into();
        }
        line
    }
}

/// What TRL's SFTTrainer logs beside the loss: the share of labelled tokens the model ranked first
/// (`mean_token_accuracy`) and the mean entropy of its predictions there, in nats (`entropy`). Each is
/// the mean over the step's micro-batches of that micro-batch's ratio (0 for one without labels), as
/// TRL averages what it logs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenMetrics {
    pub mean_token_accuracy: f64,
    pub entropy: f64,
}

impl TokenMetrics {
    /// From each example's sums, `batch_size` examples a micro-batch.
    pub fn of_micro_batches(losses: &[StepLoss], batch_size: usize) -> Self {
        let ratios: Vec<(f64, f64)> = losses
            .chunks(batch_size.max(1))
            .map(|micro| {
                let targets: usize = micro.iter().map(|l| l.targets).sum();
                if targets == 0 {
                    return (0.0, 0.0);
                }
                let correct: usize = micro.iter().map(|l| l.correct).sum();
                let entropy: f64 = micro.iter().map(|l| l.entropy_sum).sum();
                (correct as f64 / targets as f64, entropy / targets as f64)
            })
            .collect();
        let n = ratios.len().max(1) as f64;
        TokenMetrics {
            mean_token_accuracy: ratios.iter().map(|r| r.0).sum::<f64>() / n,
            entropy: ratios.iter().map(|r| r.1).sum::<f64>() / n,
        }
    }

    /// Over whole sums (a validation set, `nibble eval`): per token.
    pub fn of_total(total: &StepLoss) -> Self {
        let targets = total.targets.max(1) as f64;
        TokenMetrics {
            mean_token_accuracy: total.correct as f64 / targets,
            entropy: total.entropy_sum / targets,
        }
    }
}

/// What a trainer learns from.
pub enum Work<'a> {
    /// A language model on token sequences.
    Text {
        model: Shared<'a, Model>,
        sequences: Vec<Sequence>,
    },
    /// A FLUX.2 transformer on cached image latents and caption features.
    Image(flux2::ImageWork<'a>),
}

impl Work<'_> {
    /// What `save_adapter` writes, in words.
    pub fn adapter_kind(&self) -> &'static str {
        match self {
            Work::Text { .. } => "a PEFT folder",
            Work::Image(_) => "a LoRA file",
        }
    }

    /// How many training examples there are.
    pub fn examples(&self) -> usize {
        match self {
            Work::Text { sequences, .. } => sequences.len(),
            Work::Image(work) => work.examples.len(),
        }
    }
}

/// The file an adapter folder keeps its chat template in, where training rendered the data through
/// one of its own (`--chat-template`); `nibble generate`, `chat`, `eval` and `merge` take it with the
/// adapter.
pub const ADAPTER_CHAT_TEMPLATE: &str = "chat_template.jinja";

/// The optimizer steps of `epochs` passes of `steps_per_epoch` steps, as transformers counts them:
/// ceil(epochs · steps per epoch) in f64, so 2.2 epochs of 25 steps are 56 steps there and here.
pub fn epoch_steps(epochs: f64, steps_per_epoch: usize) -> usize {
    (epochs * steps_per_epoch as f64).ceil().max(1.0) as usize
}

/// The tokenizer files saved beside each adapter, as TRL's Trainer saves its tokenizer with the model
/// (so that `AutoTokenizer.from_pretrained(adapter)` loads what the run tokenized with): the model's
/// tokenizer.json, chat_template.jinja and tokenizer_config.json, the latter's `eos_token` the one the
/// data ended with where `--eos-token` chose another.
pub fn adapter_tokenizer_files(
    model: &crate::model::TokenizerFiles,
    eos_token: Option<&str>,
    origin: &Path,
) -> Result<crate::model::TokenizerFiles> {
    let mut files = model.clone();
    let Some(token) = eos_token else {
        return Ok(files);
    };
    // A model without a tokenizer_config.json still gets one that names the eos.
    let mut config: serde_json::Map<String, serde_json::Value> = match &model.tokenizer_config_json
    {
        Some(text) => serde_json::from_str(text).map_err(|e| Error::Config {
            path: origin.join("tokenizer_config.json"),
            msg: format!("not a JSON object: {e}"),
        })?,
        None => serde_json::Map::new(),
    };
    crate::tokenizer::set_eos_token(&mut config, token);
    files.tokenizer_config_json = Some(serde_json::to_string_pretty(&config).expect("json"));
    Ok(files)
}

/// Trainer state: the adapters, their AdamW moments, and where in the data and the RNG streams we are.
pub struct Trainer<'a> {
    pub work: Work<'a>,
    pub config: TrainConfig,
    pub adapter: LoraAdapter,
    m: LoraAdapter,
    v: LoraAdapter,
    pub step: usize,
    pub total_steps: usize,
    order: Vec<usize>,
    position: usize,
    epoch: usize,
    data_rng: Rng,
    /// LoRA dropout's masks (text), or each example's caption dropout, σ and noise (images).
    dropout_rng: Rng,
    /// The GPU executor, when training runs there: it holds the live adapters and moments.
    gpu: Option<(Shared<'a, Gpu>, GpuTrainState)>,
    /// Whether `adapter`, `m` and `v` lag behind the GPU's copies.
    stale: bool,
    /// The model as given, while `work` holds a copy with the trained token rows in its tables
    /// (`put_token_rows`): the GPU executor takes it back, its device tables holding the rows.
    model_as_given: Option<Shared<'a, Model>>,
    /// The chat template the data was rendered with where it is not the model's: saved beside each
    /// adapter (chat_template.jinja, as transformers saves a tokenizer's).
    pub chat_template: Option<String>,
    /// The tokenizer saved beside each adapter (`adapter_tokenizer_files`), as TRL's Trainer saves its
    /// tokenizer.
    pub tokenizer_files: Option<crate::model::TokenizerFiles>,
    /// Each micro-batch is one row of its sequences end to end, as TRL's best-fit packing makes it
    /// (padding-free): what NEFTune's noise scales with.
    pub padding_free: bool,
}

impl<'a> Trainer<'a> {
    /// Sets up training on tokenized `sequences` with freshly initialised adapters (or `init`).
    pub fn new(
        model: impl Into<Shared<'a, Model>>,
        config: TrainConfig,
        sequences: Vec<Sequence>,
        init: Option<LoraAdapter>,
    ) -> Result<Self> {
        if sequences.is_empty() {
            return Err(Error::Invalid("the dataset is empty".into()));
        }
        if let Some(i) = sequences.iter().position(|s| s.target_count() == 0) {
            return Err(Error::Invalid(format!(
                "example {} has no label tokens (nothing to learn from)",
                i + 1
            )));
        }
        if config.batch_size == 0 || config.grad_accum == 0 {
            return Err(Error::Invalid(
                "--batch-size and --grad-accum must be positive".into(),
            ));
        }
        let model = model.into();
        let mut init_rng = Rng::new(config.seed);
        let mut adapter = match init {
            Some(a) => a,
            None => LoraAdapter::init(&model.config, config.lora.clone(), &mut init_rng)?,
        };
        adapter.init_magnitudes(|path| model.linear_weight(path))?;
        add_trainable_tokens(&mut adapter, &model, &config.trainable_tokens)?;
        let mut trainer = Self::assemble(Work::Text { model, sequences }, config, adapter);
        trainer.put_token_rows()?;
        Ok(trainer)
    }

    /// Puts the trained token rows in place in the trainer's copy of the model's tables (made on
    /// the first call: the model may be borrowed or shared), which every CPU graph of the run then
    /// reads. On the GPU the device tables hold them (`use_gpu`, and after each step
    /// `GpuTrainState::put_token_rows`).
    fn put_token_rows(&mut self) -> Result<()> {
        if self.adapter.token_rows().next().is_none() || self.gpu.is_some() {
            return Ok(());
        }
        let Work::Text { model, .. } = &mut self.work else {
            return Err(Error::Invalid(
                "token rows train in language models, not image runs".into(),
            ));
        };
        if self.model_as_given.is_none() {
            self.model_as_given = Some(model.clone());
            // Cheap but for the tables put_trained_rows changes: the layers are shared.
            *model = Shared::Owned(std::sync::Arc::new((**model).clone()));
        }
        let Shared::Owned(own) = model else {
            unreachable!("a copy is made above")
        };
        std::sync::Arc::make_mut(own).put_trained_rows(&self.adapter)
    }

    /// Sets up training a FLUX.2 LoRA on cached image examples with a fresh adapter (or `init`).
    pub fn for_images(
        work: flux2::ImageWork<'a>,
        config: TrainConfig,
        init: Option<LoraAdapter>,
    ) -> Result<Self> {
        work.check(&config.lora)?;
        if config.batch_size == 0 || config.grad_accum == 0 {
            return Err(Error::Invalid(
                "--batch-size and --grad-accum must be positive".into(),
            ));
        }
        let adapter = work.adapter(&config.lora, &mut Rng::new(config.seed), init)?;
        Ok(Self::assemble(Work::Image(work), config, adapter))
    }

    /// Writes `adapter` into `dir` (created when missing) as this kind of run saves it: a PEFT folder
    /// (language models), with the chat template the data was rendered with where it is not the
    /// model's, or `lora.safetensors` in `form` (FLUX.2).
    pub fn save_adapter(
        &self,
        adapter: &LoraAdapter,
        dir: &Path,
        base_model: &str,
        form: flux2::LoraForm,
    ) -> Result<()> {
        let Work::Image(work) = &self.work else {
            save_peft(adapter, dir, base_model)?;
            let files = self.tokenizer_files.as_ref();
            let template = self
                .chat_template
                .as_ref()
                .or(files.and_then(|f| f.chat_template_jinja.as_ref()));
            let saved = [
                (
                    "tokenizer.json",
                    files.and_then(|f| f.tokenizer_json.as_ref()),
                ),
                (
                    "tokenizer_config.json",
                    files.and_then(|f| f.tokenizer_config_json.as_ref()),
                ),
                (ADAPTER_CHAT_TEMPLATE, template),
            ];
            for (name, text) in saved {
                if let Some(text) = text {
                    crate::fsutil::write_atomically(&dir.join(name), |tmp| {
                        std::fs::write(tmp, text)
                    })?;
                }
            }
            return Ok(());
        };
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(flux2::LORA_FILE);
        flux2::save_lora(adapter, &work.model.config, form, &path)
    }

    fn assemble(work: Work<'a>, config: TrainConfig, adapter: LoraAdapter) -> Self {
        let examples = work.examples();
        let steps_per_epoch = config.steps_per_epoch(examples);
        let total_steps = config
            .max_steps
            .unwrap_or_else(|| epoch_steps(config.epochs, steps_per_epoch));
        let mut trainer = Trainer {
            work,
            m: adapter.zeros_like(),
            v: adapter.zeros_like(),
            adapter,
            step: 0,
            total_steps,
            order: (0..examples).collect(),
            position: 0,
            epoch: 0,
            data_rng: Rng::new(config.seed ^ 0x5EED_DA7A),
            dropout_rng: Rng::new(config.seed ^ 0x0D50_F0A7),
            chat_template: None,
            tokenizer_files: None,
            padding_free: false,
            config,
            gpu: None,
            stale: false,
            model_as_given: None,
        };
        trainer.shuffle();
        trainer
    }

    fn shuffle(&mut self) {
        if !self.config.shuffle {
            return;
        }
        // Fisher-Yates with nibble's own generator, so that a resumed run reorders identically.
        for i in (1..self.order.len()).rev() {
            let j = self.data_rng.below(i as u64 + 1) as usize;
            self.order.swap(i, j);
        }
    }

    /// The examples of the next optimizer step: batch_size · grad_accum of them, or fewer where the
    /// epoch ends first. A step never reaches into the next epoch, as transformers' Trainer steps on an
    /// epoch's last batches however few (a smaller last batch, fewer accumulated ones), so that each
    /// epoch sees every example once and a batch larger than the data is the data.
    fn step_examples(&mut self) -> Vec<usize> {
        let per_step = self.config.examples_per_step();
        let mut picks = vec![self.next_example()];
        while picks.len() < per_step && self.position < self.order.len() {
            picks.push(self.next_example());
        }
        picks
    }

    fn next_example(&mut self) -> usize {
        if self.position == self.order.len() {
            self.position = 0;
            self.epoch += 1;
            self.shuffle();
        }
        self.position += 1;
        self.order[self.position - 1]
    }

    pub fn done(&self) -> bool {
        self.step >= self.total_steps
    }

    /// How many training examples there are.
    pub fn examples(&self) -> usize {
        self.work.examples()
    }

    pub fn warmup_steps(&self) -> usize {
        self.config.warmup_for(self.total_steps)
    }

    /// Σ token cross-entropy and the label-token count of `sequences` with the current adapters, on the
    /// trainer's executor, without dropout (validation loss).
    pub async fn evaluate_async(&mut self, sequences: &[Sequence]) -> Result<StepLoss> {
        let Work::Text { model, .. } = &self.work else {
            return Err(Error::Invalid(
                "validation is for language models; image runs have none yet".into(),
            ));
        };
        let mut total = StepLoss::default();
        for seq in sequences {
            let loss = match &self.gpu {
                Some((gpu, state)) => state.evaluate(gpu, seq).await?,
                None => cpu::forward_backward_with(
                    model,
                    Some(&self.adapter),
                    None,
                    seq,
                    StepOptions {
                        grad_scale: 1.0,
                        precision: self.config.precision,
                        ..StepOptions::default()
                    },
                    None,
                )?,
            };
            total += loss;
        }
        Ok(total)
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn evaluate(&mut self, sequences: &[Sequence]) -> Result<StepLoss> {
        pollster::block_on(self.evaluate_async(sequences))
    }

    /// The fractional epoch reached so far, in batches as transformers' Trainer counts it (epoch +
    /// batches done / batches in an epoch): 5 examples in batches of 2 are 3 batches, and after 4
    /// examples the epoch is at 2/3.
    pub fn epoch(&self) -> f64 {
        let batch = self.config.batch_size.max(1);
        let batches = self.order.len().div_ceil(batch).max(1);
        self.epoch as f64 + self.position.div_ceil(batch) as f64 / batches as f64
    }

    /// Moves training to the GPU executor: uploads the model, the adapters and the moments.
    pub fn use_gpu(&mut self, gpu: impl Into<Shared<'a, Gpu>>) -> Result<()> {
        let gpu = gpu.into();
        self.sync()?;
        // The device tables take the trained token rows: uploaded from the model as given, the
        // rows written in after.
        let base = match (&self.work, &self.model_as_given) {
            (Work::Text { .. }, Some(as_given)) => BaseModel::Decoder(as_given),
            (Work::Text { model, .. }, None) => BaseModel::Decoder(model),
            (Work::Image(work), _) => BaseModel::Weights(&*work.model),
        };
        let mut state = GpuTrainState::new(&gpu, base, &self.adapter, &self.m, &self.v)?;
        let rows: Vec<Vec<f32>> = self
            .adapter
            .token_rows()
            .map(|(_, p)| p.rows.clone())
            .collect();
        state.put_token_rows(&gpu, &self.adapter, &rows)?;
        // Uploading the weights is where a device too small fails first.
        gpu.check_errors()?;
        if let (Some(as_given), Work::Text { model, .. }) =
            (self.model_as_given.take(), &mut self.work)
        {
            // Once training runs there: a host copy holding the rows would be a table's memory (a
            // gigabyte for an 8B model's embedding) that nothing reads.
            *model = as_given;
        }
        self.gpu = Some((gpu, state));
        Ok(())
    }

    /// Device memory the GPU executor holds (None on the CPU): `GpuTrainState::device_bytes`.
    pub fn gpu_bytes(&self) -> Option<u64> {
        self.gpu
            .as_ref()
            .map(|(gpu, state)| state.device_bytes(gpu))
    }

    /// Where the current adapters can generate text: on the GPU with the trainer's device copies when
    /// it trains there (no download needed), else on the CPU with `adapter`. None for image runs.
    pub fn executor(&self) -> Option<crate::generate::Executor<'_>> {
        let Work::Text { model, .. } = &self.work else {
            return None;
        };
        Some(match &self.gpu {
            Some((gpu, state)) => crate::generate::Executor::Gpu {
                gpu,
                model: state.decoder()?,
                lora: Some(state.params()),
            },
            None => crate::generate::Executor::Cpu {
                model,
                adapter: Some(&self.adapter),
            },
        })
    }

    /// An image run's transformer where its steps run, with the adapter as it is (on the GPU, its
    /// device copy): what sampling an image during the run takes. None for language models.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn image_forward(
        &self,
    ) -> Option<(
        &flux2::ImageWork<'_>,
        exec::Forward<'_>,
        exec::AdapterCopies<'_>,
    )> {
        let Work::Image(work) = &self.work else {
            return None;
        };
        Some(match &self.gpu {
            Some((gpu, state)) => (
                work,
                exec::Forward::Gpu(gpu, state.frozen()),
                (&self.adapter, Some(state.params())),
            ),
            None => (
                work,
                exec::Forward::Cpu(self.config.precision),
                (&self.adapter, None),
            ),
        })
    }

    pub fn on_gpu(&self) -> bool {
        self.gpu.is_some()
    }

    /// Brings `adapter` (and AdamW's moments) up to date with the GPU's copies.
    pub async fn sync_async(&mut self) -> Result<()> {
        if let (true, Some((gpu, state))) = (self.stale, &self.gpu) {
            state
                .download(gpu, &mut self.adapter, &mut self.m, &mut self.v)
                .await?;
            self.stale = false;
            // The run's tables on the host follow the rows too (what a CPU graph would read).
            self.put_token_rows()?;
        }
        Ok(())
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn sync(&mut self) -> Result<()> {
        pollster::block_on(self.sync_async())
    }

    /// In a browser a GPU read-back must be awaited: call `sync_async` first.
    #[cfg(target_arch = "wasm32")]
    pub fn sync(&mut self) -> Result<()> {
        if self.stale {
            return Err(Error::Invalid(
                "the adapters live on the GPU: await sync_async() first".into(),
            ));
        }
        Ok(())
    }

    /// One optimizer step over batch_size · grad_accum examples.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn step(&mut self) -> Result<StepRecord> {
        pollster::block_on(self.step_async())
    }

    /// `step` for every target (on the GPU in a browser, the read-back must be awaited).
    pub async fn step_async(&mut self) -> Result<StepRecord> {
        let start = Instant::now();
        let picks = self.step_examples();
        let sequences = match &self.work {
            Work::Text { sequences, .. } => sequences,
            Work::Image(work) => {
                let picks = picks
                    .into_iter()
                    .map(|i| work.pick(i, &mut self.dropout_rng))
                    .collect();
                return self.image_step_async(picks, start).await;
            }
        };
        // Normalise by every label token of the whole optimizer step, as transformers does with
        // num_items_in_batch.
        let total_targets: usize = picks.iter().map(|&i| sequences[i].target_count()).sum();
        let scale = 1.0 / total_targets as f32;
        let tokens: usize = picks.iter().map(|&i| sequences[i].ids.len()).sum();
        let lr = self.config.lr_at(self.step, self.total_steps);
        let adamw = self.config.adamw_at(self.step, self.total_steps);
        let noise = match &self.work {
            Work::Text { model, .. } => noise_magnitudes(
                self.config.neftune_noise_alpha,
                sequences,
                &picks,
                (self.config.batch_size, self.padding_free),
                model.config.hidden_size,
            ),
            Work::Image(_) => vec![None; picks.len()],
        };
        let (losses, grad_norm) = if let Some((gpu, state)) = &mut self.gpu {
            // One seed per sequence, drawn as the CPU path draws them, so both executors use the same
            // dropout masks and noise.
            let p = self.adapter.config.dropout;
            let sequences: Vec<(&Sequence, SequenceOptions)> = picks
                .iter()
                .zip(&noise)
                .map(|(&i, &noise)| {
                    let seed = self.dropout_rng.next_u64();
                    let options = SequenceOptions {
                        grad_scale: scale,
                        checkpoint: self.config.checkpoint,
                        checkpoints: self.config.checkpoints,
                        dropout: (p > 0.0).then_some((seed, p)),
                        loss_type: self.config.loss_type,
                        noise: noise.map(|m| (seed, m)),
                        ..SequenceOptions::default()
                    };
                    (&sequences[i], options)
                })
                .collect();
            let result = state
                .step(gpu, &sequences, adamw, self.config.max_grad_norm as f32)
                .await?;
            self.stale = true;
            state.put_token_rows(gpu, &self.adapter, &result.token_rows)?;
            (result.losses, result.grad_norm)
        } else {
            self.cpu_step(&picks, &noise, scale, adamw)?
        };
        let loss_type = self.config.loss_type;
        let loss_sum: f64 = losses.iter().map(|l| l.sum_of(loss_type)).sum();
        let mut record = self.finish_step(
            start,
            (loss_sum / total_targets as f64, lr, grad_norm),
            tokens,
        )?;
        record.predictions = Some(TokenMetrics::of_micro_batches(
            &losses,
            self.config.batch_size,
        ));
        Ok(record)
    }

    /// One optimizer step of an image run over `picks` (each example with its caption dropout and
    /// draw): the loss is the mean over them of each example's mean squared error.
    pub async fn image_step_async(
        &mut self,
        picks: Vec<flux2::ImagePick>,
        start: Instant,
    ) -> Result<StepRecord> {
        let Work::Image(work) = &self.work else {
            return Err(Error::Invalid("image steps need an image run".into()));
        };
        if picks.is_empty() {
            return Err(Error::Invalid("an optimizer step needs examples".into()));
        }
        let tokens: usize = picks.iter().map(|p| work.tokens(p)).sum();
        let lr = self.config.lr_at(self.step, self.total_steps);
        let adamw = self.config.adamw_at(self.step, self.total_steps);
        let (checkpoint, precision) = (self.config.checkpoint, self.config.precision);
        let (loss_sum, grad_norm) = if let Some((gpu, state)) = &self.gpu {
            let spec = crate::models::decoder::LoraSpec::of(&self.adapter);
            let scale = 1.0 / picks.len() as f32;
            let graphs: Vec<_> = picks
                .iter()
                .map(|p| work.graph(p, &spec, scale, checkpoint))
                .collect();
            let result = state
                .step_graphs(gpu, &graphs, adamw, self.config.max_grad_norm as f32)
                .await?;
            self.stale = true;
            let losses = result.losses.iter().zip(&picks);
            (
                losses.map(|(l, p)| p.weighted(l.loss_sum)).sum::<f64>(),
                result.grad_norm,
            )
        } else {
            let mut grads = self.adapter.zeros_like();
            let loss_sum = work.cpu_forward_backward(
                &picks,
                &self.adapter,
                &mut grads,
                (checkpoint, precision),
            )?;
            (loss_sum, self.cpu_optimize(&mut grads, adamw)?)
        };
        self.finish_step(
            start,
            (loss_sum / picks.len() as f64, lr, grad_norm),
            tokens,
        )
    }

    /// `image_step_async`, blocking.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn image_step(&mut self, picks: Vec<flux2::ImagePick>) -> Result<StepRecord> {
        pollster::block_on(self.image_step_async(picks, Instant::now()))
    }

    /// The record of the step just taken; a loss that is not finite stops the run.
    fn finish_step(
        &mut self,
        start: Instant,
        (loss, lr, grad_norm): (f64, f64, f64),
        tokens: usize,
    ) -> Result<StepRecord> {
        if !loss.is_finite() {
            return Err(Error::Diverged(format!(
                "the loss became {loss} at step {}; stopping",
                self.step + 1
            )));
        }
        self.step += 1;
        let elapsed = start.elapsed().as_secs_f64();
        Ok(StepRecord {
            step: self.step,
            epoch: self.epoch(),
            loss,
            lr,
            grad_norm,
            tokens,
            tokens_per_s: tokens as f64 / elapsed,
            predictions: None,
        })
    }
}

impl Trainer<'_> {
    /// Forward and backward over the picked examples on the CPU, then clipping and AdamW. Returns each
    /// example's sums and the gradient norm before clipping.
    fn cpu_step(
        &mut self,
        picks: &[usize],
        noise: &[Option<f32>],
        scale: f32,
        adamw: AdamWParams,
    ) -> Result<(Vec<StepLoss>, f64)> {
        let Work::Text { model, sequences } = &self.work else {
            return Err(Error::Invalid("text steps need a text run".into()));
        };
        let mut grads = self.adapter.zeros_like();
        let mut losses = Vec::with_capacity(picks.len());
        let options = StepOptions {
            grad_scale: scale,
            checkpoint: self.config.checkpoint,
            checkpoints: self.config.checkpoints,
            precision: self.config.precision,
            loss_type: self.config.loss_type,
            ..StepOptions::default()
        };
        // DoRA's factors change only with the optimizer step: the first micro-batch computes them.
        let mut kept = cpu::KvCache::new(model);
        for (&i, &noise) in picks.iter().zip(noise) {
            let dora_factors = match kept.keeps_dora_factors() {
                true => FactorSource::Kept,
                false => FactorSource::ComputeAndKeep,
            };
            let loss = cpu::forward_backward_keeping(
                model,
                Some(&self.adapter),
                Some(&mut grads),
                &sequences[i],
                StepOptions {
                    noise,
                    dora_factors,
                    ..options
                },
                (Some(&mut self.dropout_rng), &mut kept),
            )?;
            losses.push(loss);
        }
        Ok((losses, self.cpu_optimize(&mut grads, adamw)?))
    }

    /// Clipping and AdamW on the CPU with `grads`; returns their norm before clipping.
    fn cpu_optimize(&mut self, grads: &mut LoraAdapter, adamw: AdamWParams) -> Result<f64> {
        let model: &dyn crate::model::FrozenWeights = match &self.work {
            Work::Text { model, .. } => &**model,
            Work::Image(work) => &*work.model,
        };
        let state = exec::cpu::OptimizerState {
            params: &mut self.adapter,
            m: &mut self.m,
            v: &mut self.v,
        };
        let norm = cpu_optimizer_step(
            model,
            grads,
            state,
            (self.config.max_grad_norm, adamw),
            self.config.precision,
        )?;
        self.put_token_rows()?;
        Ok(norm)
    }
}

/// Clipping and AdamW on the CPU, for any model's adapter: the optimizer graph over `state`'s matrices
/// and moments (updated in place) with `grads`, clipped at `max_norm` (≤ 0: not clipped). Returns the
/// gradients' global norm before clipping.
pub fn cpu_optimizer_step(
    model: &dyn crate::model::FrozenWeights,
    grads: &mut LoraAdapter,
    state: exec::cpu::OptimizerState,
    (max_norm, adamw): (f64, AdamWParams),
    precision: crate::ops::Precision,
) -> Result<f64> {
    let graph = optimizer::build(&optimizer::shapes(state.params), max_norm);
    let inputs = StepInputs {
        adamw: bytemuck::cast(adamw),
        ..StepInputs::default()
    };
    let mut out = exec::cpu::run(
        &graph,
        exec::cpu::Bindings {
            model,
            adapter: None,
            grads: Some(grads),
            cache: None,
            optimizer: Some(state),
            inputs: &inputs,
            precision,
        },
    )?;
    Ok(out.take("clip")[0] as f64)
}

/// Adds trained rows of `ids` to `adapter`, starting as the model's: the embedding's, and an untied
/// model's output projection's (a tied model's are the same rows). An adapter that trains rows
/// already must train these.
fn add_trainable_tokens(adapter: &mut LoraAdapter, model: &Model, ids: &[u32]) -> Result<()> {
    let c = &model.config;
    let trains_rows = !ids.is_empty() || adapter.token_rows().next().is_some();
    if trains_rows && c.per_layer_inputs.is_some() {
        return Err(Error::Invalid(
            "trainable token rows: this model's per-layer inputs read the embeddings too, which \
             nibble does not take gradients through; train its LoRA matrices alone"
                .into(),
        ));
    }
    if ids.is_empty() {
        return Ok(());
    }
    let ids: Vec<usize> = ids.iter().map(|&id| id as usize).collect();
    let embedding = c.embedding_module();
    if adapter.token_rows().next().is_some() {
        // What a fresh run with these ids trains: the embedding's rows, and an untied model's
        // output projection's, each the same set.
        let wanted = c.token_row_modules();
        let set = |v: &[usize]| v.iter().copied().collect::<std::collections::BTreeSet<_>>();
        let same = adapter.token_rows().count() == wanted.len()
            && adapter.token_rows().all(|(path, p)| {
                wanted.iter().any(|w| w == path) && set(&p.token_ids) == set(&ids)
            });
        let trained: Vec<String> = adapter
            .token_rows()
            .map(|(path, p)| format!("{path} {:?}", p.token_ids))
            .collect();
        return match same {
            true => Ok(()),
            false => Err(Error::Invalid(format!(
                "--trainable-tokens {ids:?}: the adapter trained on trains other rows ({}); \
                 leave the option out to train those",
                trained.join(", ")
            ))),
        };
    }
    let mut seen = std::collections::HashSet::new();
    for &id in &ids {
        if id >= c.vocab_size {
            return Err(Error::Invalid(format!(
                "--trainable-tokens: token id {id} is past the model's vocabulary of {}",
                c.vocab_size
            )));
        }
        if !seen.insert(id) {
            return Err(Error::Invalid(format!(
                "--trainable-tokens: token id {id} is listed twice"
            )));
        }
    }
    let width = c.hidden_size;
    adapter.add_token_rows(&embedding, ids.clone(), width, |id, row| {
        model.embed.row_f32(id, row)
    });
    if let Some(head) = &model.lm_head {
        adapter.add_token_rows(crate::config::OUTPUT_MODULE, ids, width, |id, row| {
            head.row_f32(id, row)
        });
    }
    Ok(())
}

pub const CHECKPOINT_PREFIX: &str = "checkpoint-";

fn rng_to_json(r: &Rng) -> serde_json::Value {
    // u64 words as strings: JSON numbers lose bits above 2^53.
    json!(r.state().iter().map(|w| w.to_string()).collect::<Vec<_>>())
}

fn rng_from_json(v: &serde_json::Value) -> Option<Rng> {
    let words: Vec<u64> = v
        .as_array()?
        .iter()
        .map(|w| w.as_str()?.parse().ok())
        .collect::<Option<_>>()?;
    Some(Rng::from_state(words.try_into().ok()?))
}

impl Trainer<'_> {
    /// Writes `checkpoint-<step>/` in `run_dir`: the adapter (a PEFT folder), AdamW's moments, the RNG
    /// states and the data position. It is written under a temporary name and renamed, so a folder with
    /// the final name is always complete.
    /// `manifest`, when given, is written beside them as run.json (what `--resume` compares).
    pub fn save_checkpoint(
        &mut self,
        run_dir: &Path,
        base_model: &str,
        manifest: Option<&serde_json::Value>,
    ) -> Result<std::path::PathBuf> {
        self.sync()?;
        let name = format!("{CHECKPOINT_PREFIX}{}", self.step);
        let final_dir = run_dir.join(&name);
        let tmp = run_dir.join(format!(".{name}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        let _partial = crate::fsutil::Partial::folder(&tmp);
        let written = self.write_checkpoint(&tmp, base_model, manifest);
        if written.is_err() {
            // A full disk, say: what was written of it is no checkpoint, and only takes room.
            let _ = std::fs::remove_dir_all(&tmp);
        }
        written?;
        let _ = std::fs::remove_dir_all(&final_dir);
        std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
        Ok(final_dir)
    }

    /// `save_checkpoint`'s files, into the folder `tmp`.
    fn write_checkpoint(
        &mut self,
        tmp: &Path,
        base_model: &str,
        manifest: Option<&serde_json::Value>,
    ) -> Result<()> {
        self.save_adapter(&self.adapter, tmp, base_model, flux2::LoraForm::Exact)?;
        if let Some(manifest) = manifest {
            let path = tmp.join(MANIFEST);
            std::fs::write(&path, manifest.to_string()).map_err(|e| Error::io(&path, e))?;
        }
        let moments: Vec<(String, Vec<usize>, &[f32])> = [("m", &self.m), ("v", &self.v)]
            .into_iter()
            .flat_map(|(moment, adapter)| {
                adapter.trained().flat_map(move |(path, p)| {
                    p.factors().map(move |f| {
                        let values = p.factor(f);
                        (
                            format!("{moment}.{}", factor_key(path, f)),
                            vec![values.len()],
                            values,
                        )
                    })
                })
            })
            .collect();
        let views = moments
            .iter()
            .map(|(n, shape, data)| {
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    bytemuck::cast_slice(data),
                )
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::tensor(tmp.join("optimizer.safetensors"), n, e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        crate::fsutil::write_atomically(&tmp.join("optimizer.safetensors"), |t| {
            safetensors::serialize_to_file(views, None, t)
                .map_err(|e| std::io::Error::other(e.to_string()))
        })?;
        let state = json!({
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": self.epoch,
            "position": self.position,
            "order": self.order,
            "data_rng": rng_to_json(&self.data_rng),
            "dropout_rng": rng_to_json(&self.dropout_rng),
            "examples": self.work.examples(),
        });
        crate::fsutil::write_atomically(&tmp.join(STATE_FILE), |t| {
            std::fs::write(t, state.to_string())
        })
    }

    /// Restores adapters, moments, RNG states and data position from a checkpoint folder written by
    /// `save_checkpoint`; returns the steps the run that wrote it meant to take.
    pub fn restore(&mut self, checkpoint: &Path) -> Result<usize> {
        let state_path = state_file(checkpoint).unwrap_or_else(|| checkpoint.join(STATE_FILE));
        let text =
            crate::fsutil::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
        let bad = |msg: &str| Error::Config {
            path: state_path.clone(),
            msg: msg.to_string(),
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|_| bad("not valid JSON"))?;
        let num = |k: &str| match v.get(k) {
            None => Err(bad(&format!("`{k}` missing"))),
            Some(x) => x
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| bad(&format!("`{k}` must be a whole number >= 0, got {x}"))),
        };
        if num("examples")? != self.work.examples() {
            return Err(bad(
                "the checkpoint was made with a different dataset (example count differs)",
            ));
        }
        let order: Vec<usize> = v
            .get("order")
            .and_then(|o| o.as_array())
            .map(|o| {
                o.iter()
                    .filter_map(|x| x.as_u64().map(|x| x as usize))
                    .collect()
            })
            .ok_or_else(|| bad("`order` missing"))?;
        let n = self.work.examples();
        let mut seen = vec![false; n];
        let permutation = order.len() == n
            && order
                .iter()
                .all(|&i| i < n && !std::mem::replace(&mut seen[i], true));
        if !permutation {
            return Err(bad(&format!(
                "`order` is not an ordering of the dataset's {n} examples"
            )));
        }
        let files = crate::source::ModelFiles::Dir(checkpoint.to_path_buf());
        let adapter = match &self.work {
            Work::Text { model, .. } => LoraAdapter::load_peft(&files, &model.config)?,
            Work::Image(work) => {
                let file = files.open_safetensors(flux2::LORA_FILE)?;
                flux2::load_lora_like(&file, &work.model.config, &self.adapter)?
            }
        };
        let opt = crate::source::ModelFiles::Dir(checkpoint.to_path_buf())
            .open_safetensors("optimizer.safetensors")?;
        let mut m = adapter.zeros_like();
        let mut vv = adapter.zeros_like();
        let opt_path = checkpoint.join("optimizer.safetensors");
        let read = |name: String, like: &[f32], second_moment: bool| -> Result<Vec<f32>> {
            let values = opt.read_f32(&name)?;
            if values.len() != like.len() {
                return Err(Error::tensor(
                    &opt_path,
                    &name,
                    format!(
                        "{} values where the adapter has {}",
                        values.len(),
                        like.len()
                    ),
                ));
            }
            if values.iter().any(|v| !v.is_finite()) {
                return Err(Error::tensor(
                    &opt_path,
                    &name,
                    "holds NaN or infinite values",
                ));
            }
            // A mean of squares: a negative one would make AdamW's step NaN some steps later.
            if second_moment && let Some(v) = values.iter().find(|v| **v < 0.0) {
                return Err(Error::tensor(
                    &opt_path,
                    &name,
                    format!("holds {v}, where AdamW's second moments are never negative"),
                ));
            }
            Ok(values)
        };
        for (moment, adapter) in [("m", &mut m), ("v", &mut vv)] {
            for (path, p) in adapter.trained_mut() {
                for f in p.factors().collect::<Vec<_>>() {
                    let name = format!("{moment}.{}", factor_key(path, f));
                    let values = read(name, p.factor(f), moment == "v")?;
                    *p.factor_mut(f) = values;
                }
            }
        }
        self.adapter = adapter;
        self.m = m;
        self.v = vv;
        self.put_token_rows()?;
        let (step, total_steps, position) = (num("step")?, num("total_steps")?, num("position")?);
        if step > total_steps || position > n {
            return Err(bad(&format!(
                "step {step} of {total_steps} at example {position} of {n} is not a possible state"
            )));
        }
        let epoch = num("epoch")?;
        // Where a run whose steps end with their epochs stands after `step` steps. A checkpoint of an
        // earlier nibble, whose steps reached into the next epoch, stands elsewhere when the epoch's
        // examples are not whole steps: its run cannot go on as it began.
        let per_step = self.config.examples_per_step();
        let steps_per_epoch = self.config.steps_per_epoch(n).max(1);
        let expected = match (step, step % steps_per_epoch) {
            (0, _) => (0, 0),
            (s, 0) => (s / steps_per_epoch - 1, n),
            (s, k) => (s / steps_per_epoch, k * per_step),
        };
        if (epoch, position) != expected {
            return Err(bad(&format!(
                "after {step} steps the run stands at example {position} of epoch {epoch}, where \
                 this nibble's steps, which end with their epoch, stand at example {} of epoch {}: \
                 the checkpoint comes from an earlier nibble whose steps reached into the next \
                 epoch; finish it with that version, or start over with --overwrite",
                expected.1, expected.0
            )));
        }
        // A run may go on for more (or fewer) steps than it first meant to, as transformers'
        // resume_from_checkpoint under another max_steps does: the schedule follows this run's count.
        if step > self.total_steps {
            return Err(bad(&format!(
                "the checkpoint is at step {step}, past this run's {} steps (--max-steps, \
                 --epochs): ask for more steps to go on from it",
                self.total_steps
            )));
        }
        self.step = step;
        self.epoch = epoch;
        self.position = position;
        self.order = order;
        let rng = |k: &str| match v.get(k) {
            None => Err(bad(&format!("`{k}` missing"))),
            Some(x) => rng_from_json(x)
                .ok_or_else(|| bad(&format!("`{k}` is not a generator's state, got {x}"))),
        };
        self.data_rng = rng("data_rng")?;
        self.dropout_rng = rng("dropout_rng")?;
        self.stale = false;
        if let Some((gpu, state)) = self.gpu.take() {
            // The old copies go before the new ones are uploaded: a model held twice may not fit.
            drop(state);
            self.use_gpu(gpu)?;
        }
        Ok(total_steps)
    }
}

/// The file in a run folder and in each of its checkpoints that records what the run is.
pub const MANIFEST: &str = "run.json";

/// The run's options as an options file, every default filled in (`settings::TrainSettings::record`):
/// `nibble train --config` takes it back.
pub const RECORD_FILE: &str = "nibble_config.toml";

/// The file in each checkpoint that holds where the trainer is (step, data order and position, RNG
/// states): nibble's own schema under nibble's own name.
pub const STATE_FILE: &str = "nibble_state.json";

/// What nibble's checkpoints called `STATE_FILE` until December 2026: the name of Hugging Face
/// Trainer's file, of another schema. Such checkpoints still resume.
const LEGACY_STATE_FILE: &str = "trainer_state.json";

/// The trainer state of a complete checkpoint folder: `STATE_FILE`, or the legacy name beside nibble's
/// optimizer state (a Hugging Face Trainer's checkpoint has its own trainer_state.json).
pub fn state_file(checkpoint: &Path) -> Option<std::path::PathBuf> {
    let current = checkpoint.join(STATE_FILE);
    let legacy = checkpoint.join(LEGACY_STATE_FILE);
    if current.is_file() {
        Some(current)
    } else if legacy.is_file() && checkpoint.join("optimizer.safetensors").is_file() {
        Some(legacy)
    } else {
        None
    }
}

/// Whether `dir` holds a run's final adapter (a run that ended, or that a later resume goes on with).
pub fn holds_finished_run(dir: &Path) -> bool {
    ["adapter_model.safetensors", crate::train::flux2::LORA_FILE]
        .iter()
        .any(|f| dir.join(f).exists())
}

/// The newest complete checkpoint in a run folder (or the folder itself, if it is a checkpoint).
pub fn newest_checkpoint(dir: &Path) -> Result<Option<std::path::PathBuf>> {
    if state_file(dir).is_some() {
        return Ok(Some(dir.to_path_buf()));
    }
    let newest = checkpoints(dir)?
        .into_iter()
        .max_by_key(|(step, _)| *step)
        .map(|(_, p)| p);
    Ok(newest)
}

/// The complete checkpoints in a run folder, with their steps.
pub fn checkpoints(dir: &Path) -> Result<Vec<(usize, std::path::PathBuf)>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    Ok(entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step: usize = name.strip_prefix(CHECKPOINT_PREFIX)?.parse().ok()?;
            state_file(&e.path()).map(|_| (step, e.path()))
        })
        .collect())
}

/// Writes a PEFT adapter folder (adapter_model.safetensors + adapter_config.json) that
/// `PeftModel.from_pretrained` loads; each file appears atomically.
/// `target_modules` as PEFT saves it: the entries given, with `all-linear` expanded (as PEFT expands it)
/// to the names of the linears it adapted. The text decoder of a multimodal model lists every adapted
/// module by its full path: a name such as `q_proj` would also have PEFT wrap the vision tower's.
fn saved_targets(adapter: &LoraAdapter) -> Vec<String> {
    if adapter
        .pairs()
        .any(|(path, _)| path.contains(".language_model."))
    {
        return adapter.pairs().map(|(path, _)| path.to_string()).collect();
    }
    // The routers' and experts' pairs are target_parameters' (on Qwen2-MoE, all-linear beside them).
    let parameter = |path: &str, pair: &crate::lora::LoraPair| {
        pair.experts > 1
            || (crate::config::is_router_path(path) && !adapter.config.target_parameters.is_empty())
    };
    let mut out: Vec<String> = Vec::new();
    for t in &adapter.config.targets {
        let names: Vec<String> = if t == "all-linear" {
            adapter
                .pairs()
                .filter(|(path, pair)| !parameter(path, pair))
                .map(|(path, _)| path.rsplit('.').next().unwrap_or(path).to_string())
                .collect()
        } else {
            vec![t.clone()]
        };
        for n in names {
            if !out.contains(&n) {
                out.push(n);
            }
        }
    }
    out
}

/// A PEFT adapter folder's two files, in memory: (adapter_model.safetensors, adapter_config.json).
pub fn peft_files(adapter: &LoraAdapter, base_model: &str) -> Result<(Vec<u8>, String)> {
    // A folder that says use_dora must hold every magnitude, and one that does not, none: PEFT (and
    // nibble) would not load it otherwise.
    if let Some((path, _)) = adapter
        .pairs()
        .find(|(_, p)| p.magnitude.is_empty() == adapter.config.use_dora)
    {
        return Err(Error::Invalid(format!(
            "{path}: the adapter {} DoRA, and this linear {} a magnitude (LoraAdapter::init_magnitudes)",
            if adapter.config.use_dora {
                "is"
            } else {
                "is not"
            },
            if adapter.config.use_dora {
                "has no"
            } else {
                "has"
            },
        )));
    }
    let mut views = Vec::new();
    let keys: Vec<(String, Vec<usize>, std::borrow::Cow<[f32]>)> = adapter
        .trained()
        .flat_map(|(path, p)| {
            p.factors()
                .map(move |f| (adapter.saved_key(path, f), p.shape(f), p.peft_factor(f)))
        })
        .collect();
    for (name, shape, data) in &keys {
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            shape.clone(),
            bytemuck::cast_slice(&data[..]),
        )
        .map_err(|e| Error::tensor("adapter_model.safetensors", name, e.to_string()))?;
        views.push((name.clone(), view));
    }
    let weights = safetensors::serialize(
        views,
        Some(std::collections::HashMap::from([(
            "format".to_string(),
            "pt".to_string(),
        )])),
    )
    .map_err(|e| Error::Invalid(format!("adapter_model.safetensors: {e}")))?;
    let c = &adapter.config;
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": c.r,
        "lora_alpha": c.alpha,
        // The f32 probability as its shortest decimal, as PEFT writes the one it was given (0.05,
        // not 0.05000000074505806).
        "lora_dropout": c.dropout.to_string().parse::<f64>().unwrap_or(f64::from(c.dropout)),
        "target_modules": saved_targets(adapter),
        "target_parameters": match c.target_parameters.is_empty() {
            true => serde_json::Value::Null,
            false => json!(c.target_parameters),
        },
        "bias": "none",
        "use_rslora": c.use_rslora,
        "use_dora": c.use_dora,
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "trainable_token_indices": trainable_token_indices(adapter),
        "rank_pattern": c.rank_pattern.to_json(),
        "alpha_pattern": c.alpha_pattern.to_json(),
        "revision": null,
    });
    Ok((
        weights,
        serde_json::to_string_pretty(&config).expect("json"),
    ))
}

/// PEFT's `trainable_token_indices` for the adapter's trained rows: a list where it trains the
/// embedding's alone (a tied model's output projection reads them too, as PEFT ties it), else a map
/// of each table's module name to its ids.
fn trainable_token_indices(adapter: &LoraAdapter) -> serde_json::Value {
    let tables: Vec<(&str, &[usize])> = adapter
        .token_rows()
        .map(|(path, p)| (path.rsplit('.').next().unwrap_or(path), &p.token_ids[..]))
        .collect();
    match tables[..] {
        [] => serde_json::Value::Null,
        [("embed_tokens", ids)] => json!(ids),
        _ => tables
            .into_iter()
            .map(|(name, ids)| (name.to_string(), json!(ids)))
            .collect::<serde_json::Map<_, _>>()
            .into(),
    }
}

/// Writes the adapter as a PEFT folder (each file written atomically).
pub fn save_peft(adapter: &LoraAdapter, dir: &Path, base_model: &str) -> Result<()> {
    let (weights, config) = peft_files(adapter, base_model)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    crate::fsutil::write_atomically(&dir.join("adapter_model.safetensors"), |tmp| {
        std::fs::write(tmp, &weights)
    })?;
    crate::fsutil::write_atomically(&dir.join("adapter_config.json"), |tmp| {
        std::fs::write(tmp, &config)
    })
}
