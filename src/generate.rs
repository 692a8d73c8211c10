//! Text generation with a KV cache on either executor: greedy or sampled as transformers samples,
//! stopping at the chat template's end-of-turn token.

use crate::cpu::{self, KvCache, Sequence, StepLoss};
use crate::error::Result;
use crate::exec::gpu::GpuKvCache;
use crate::gpu::Gpu;
use crate::gpu::weights::{GpuLora, GpuModel};
use crate::lora::LoraAdapter;
use crate::model::Model;
use crate::ops::Precision;
use crate::rng::Rng;
use crate::tokenizer::ChatTokenizer;
use std::ops::ControlFlow;

/// How the next token is picked from the logits, as transformers' `generate` picks it (its logits
/// processors, in its order: the repetition penalty, then when sampling temperature, top-k, top-p
/// and min-p).
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Sample among the k most likely tokens only (0: all).
    pub top_k: usize,
    /// Sample from the smallest set of tokens whose probabilities reach top_p (1: all).
    pub top_p: f32,
    /// Drop the tokens less likely than min_p times the most likely one (0: none).
    pub min_p: f32,
    /// Each token already in the context has its logit divided by this where positive, multiplied
    /// where negative (1: none); greedy decoding too.
    pub repetition_penalty: f32,
    pub seed: u64,
}

/// Greedy, with transformers' defaults for what sampling would use (its top-k of 50 among them).
impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 50,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl Sampling {
    /// What transformers' `generate` does by default with a model whose generation_config.json
    /// holds `config`: greedy unless `do_sample`, then its temperature, top_k, top_p and min_p, each
    /// at transformers' default where left out (1, 50, 1, none); its repetition_penalty either way.
    pub fn of_generation_config(config: &serde_json::Value) -> std::result::Result<Self, String> {
        if !config.is_object() {
            return Err(format!(
                "{config} is not a JSON object of generation settings"
            ));
        }
        let number = |key: &str, default: f64| -> std::result::Result<f64, String> {
            match config.get(key) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(v) => v
                    .as_f64()
                    .ok_or_else(|| format!("`{key}: {v}` must be a number")),
            }
        };
        let do_sample = match config.get("do_sample") {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Bool(b)) => *b,
            Some(v) => return Err(format!("`do_sample: {v}` must be true or false")),
        };
        // Kept when the config does not sample: a --temperature that asks for sampling takes them,
        // as transformers' generate(do_sample=True) takes the config's values.
        let temperature = number("temperature", 1.0)? as f32;
        if do_sample && temperature <= 0.0 {
            return Err(format!(
                "`temperature: {temperature}` with `do_sample: true`: sampling needs a \
                 temperature above 0 (transformers refuses it too)"
            ));
        }
        let sampling = Sampling {
            temperature: if do_sample { temperature } else { 0.0 },
            top_k: match number("top_k", 50.0)? {
                k if k >= 0.0 && k.fract() == 0.0 && k <= u32::MAX as f64 => k as usize,
                k => return Err(format!("`top_k: {k}` must be a whole number >= 0")),
            },
            top_p: number("top_p", 1.0)? as f32,
            min_p: number("min_p", 0.0)? as f32,
            repetition_penalty: number("repetition_penalty", 1.0)? as f32,
            seed: 0,
        };
        sampling.check().map(|()| sampling)
    }

    /// The settings of `config` that transformers' `generate` would apply and nibble does not
    /// (`no_repeat_ngram_size: 3`), each where it differs from transformers' default.
    pub fn unapplied(config: &serde_json::Value) -> Vec<String> {
        use serde_json::Value;
        // (key, its default: what changes nothing), as transformers' GenerationConfig has them.
        const UNAPPLIED: &[(&str, Option<f64>)] = &[
            ("no_repeat_ngram_size", Some(0.0)),
            ("encoder_no_repeat_ngram_size", Some(0.0)),
            ("typical_p", Some(1.0)),
            ("epsilon_cutoff", Some(0.0)),
            ("eta_cutoff", Some(0.0)),
            ("num_beams", Some(1.0)),
            ("num_beam_groups", Some(1.0)),
            ("diversity_penalty", Some(0.0)),
            ("encoder_repetition_penalty", Some(1.0)),
            ("min_length", Some(0.0)),
            ("min_new_tokens", None),
            ("penalty_alpha", None),
            ("bad_words_ids", None),
            ("suppress_tokens", None),
            ("begin_suppress_tokens", None),
            ("forced_bos_token_id", None),
            ("forced_eos_token_id", None),
            ("sequence_bias", None),
            ("exponential_decay_length_penalty", None),
            ("guidance_scale", None),
        ];
        UNAPPLIED
            .iter()
            .filter_map(|&(key, default)| {
                let v = config.get(key)?;
                let unchanged = match (v, default) {
                    (Value::Null, _) => true,
                    (v, Some(d)) => v.as_f64() == Some(d),
                    (Value::Array(a), None) => a.is_empty(),
                    (_, None) => false,
                };
                (!unchanged).then(|| format!("{key}: {v}"))
            })
            .collect()
    }

    /// Refuses values no processor takes, naming the option (`--top-p` as the command line
    /// spells it).
    pub fn check(&self) -> std::result::Result<(), String> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(format!(
                "temperature must be a finite number >= 0 (got {t})"
            ));
        }
        // 0 keeps the most likely token alone, as transformers' TopPLogitsWarper takes it.
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err(format!("top-p must lie in [0, 1] (got {})", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min-p must lie in [0, 1] (got {})", self.min_p));
        }
        let penalty = self.repetition_penalty;
        if !(penalty.is_finite() && penalty > 0.0) {
            return Err(format!(
                "repetition-penalty must be a finite number above 0 (got {penalty})"
            ));
        }
        Ok(())
    }

    /// The settings as a person reads them.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        match self.temperature > 0.0 {
            false => parts.push("greedy".to_string()),
            true => {
                parts.push(format!("temperature {}", self.temperature));
                if self.top_k > 0 {
                    parts.push(format!("top-k {}", self.top_k));
                }
                if self.top_p < 1.0 {
                    parts.push(format!("top-p {}", self.top_p));
                }
                if self.min_p > 0.0 {
                    parts.push(format!("min-p {}", self.min_p));
                }
            }
        }
        if self.repetition_penalty != 1.0 {
            parts.push(format!("repetition penalty {}", self.repetition_penalty));
        }
        parts.join(", ")
    }
}

/// The logits after the repetition penalty over the tokens of `context` (each once).
fn penalized(logits: &[f32], penalty: f32, context: &[u32]) -> Vec<f32> {
    let mut scores = logits.to_vec();
    if penalty != 1.0 {
        let mut seen = vec![false; scores.len()];
        for &id in context {
            let Some(score) = scores.get_mut(id as usize) else {
                continue;
            };
            if !std::mem::replace(&mut seen[id as usize], true) {
                *score = match *score < 0.0 {
                    true => *score * penalty,
                    false => *score / penalty,
                };
            }
        }
    }
    scores
}

/// The next token's distribution when sampling (temperature above 0), after the context's
/// repetition penalty, temperature, top-k, top-p and min-p as transformers applies them: the tokens
/// kept with their probabilities, most likely first (ties by token id).
pub fn distribution(logits: &[f32], sampling: &Sampling, context: &[u32]) -> Vec<(u32, f64)> {
    let scores = penalized(logits, sampling.repetition_penalty, context);
    let temperature = sampling.temperature as f64;
    let mut kept: Vec<(u32, f64)> = scores
        .iter()
        .enumerate()
        .map(|(i, &s)| (i as u32, s as f64 / temperature))
        .collect();
    kept.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    // Top-k keeps every token scoring at least the k-th best: transformers removes those scoring
    // below it, so ties stay.
    if sampling.top_k > 0 && sampling.top_k < kept.len() {
        let least = kept[sampling.top_k - 1].1;
        kept.retain(|&(_, s)| s >= least);
    }
    let softmax = |kept: &[(u32, f64)]| -> Vec<f64> {
        let max = kept[0].1;
        let weights: Vec<f64> = kept.iter().map(|&(_, s)| (s - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        weights.into_iter().map(|w| w / total).collect()
    };
    // Top-p drops the least likely tokens while their mass, summed from the least, stays within
    // 1 − top_p; the most likely token always stays.
    if sampling.top_p < 1.0 {
        let probs = softmax(&kept);
        let mut tail = 0.0;
        let mut keep = kept.len();
        for (i, p) in probs.iter().enumerate().rev().take(kept.len() - 1) {
            tail += p;
            if tail > 1.0 - sampling.top_p as f64 {
                break;
            }
            keep = i;
        }
        kept.truncate(keep);
    }
    if sampling.min_p > 0.0 {
        let probs = softmax(&kept);
        let least = sampling.min_p as f64 * probs[0];
        let keep = probs.iter().take_while(|&&p| p >= least).count().max(1);
        kept.truncate(keep);
    }
    let probs = softmax(&kept);
    kept.iter()
        .zip(probs)
        .map(|(&(id, _), p)| (id, p))
        .collect()
}

/// Picks the next token from `logits` after the tokens of `context` (the prompt and the answer so
/// far, which the repetition penalty reads).
pub fn sample(logits: &[f32], sampling: &Sampling, context: &[u32], rng: &mut Rng) -> u32 {
    if sampling.temperature <= 0.0 {
        let scores = penalized(logits, sampling.repetition_penalty, context);
        return scores
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
            .map_or(0, |(i, _)| i as u32);
    }
    let kept = distribution(logits, sampling, context);
    let mut u = rng.uniform();
    for &(id, p) in &kept {
        u -= p;
        if u <= 0.0 {
            return id;
        }
    }
    kept[kept.len() - 1].0
}

/// Tokens that end an assistant turn: the tokenizer's eos token, the end-of-turn tokens of the chat
/// formats nibble knows (Qwen's <|im_end|>, Llama 3's <|eot_id|>) where the vocabulary has them, and
/// the special token the chat template closes an assistant turn with (a template given with
/// `--chat-template` may close turns with a token the model's own does not).
pub fn stop_tokens(tok: &ChatTokenizer) -> Vec<u32> {
    let mut stop: Vec<u32> = tok
        .eos_token
        .iter()
        .map(String::as_str)
        .chain([
            "<|im_end|>",
            "<|eot_id|>",
            "<|endoftext|>",
            "<|end_of_text|>",
        ])
        .filter_map(|t| tok.token_id(t))
        .chain(turn_end_token(tok))
        .collect();
    stop.sort_unstable();
    stop.dedup();
    stop
}

/// Where decoding runs: the model (and adapter) on the CPU executor or uploaded to a GPU.
#[derive(Clone, Copy)]
pub enum Executor<'a> {
    Cpu {
        model: &'a Model,
        adapter: Option<&'a LoraAdapter>,
    },
    Gpu {
        gpu: &'a Gpu,
        model: &'a GpuModel,
        lora: Option<&'a GpuLora>,
    },
}

/// A model and an optional adapter kept where inference runs: on the CPU, or uploaded to a GPU.
pub struct Placed {
    pub model: Model,
    pub adapter: Option<LoraAdapter>,
    gpu: Option<(Gpu, GpuModel, Option<GpuLora>)>,
}

impl Placed {
    /// Uploads the model and adapter to `gpu` when one is given.
    pub fn new(model: Model, adapter: Option<LoraAdapter>, gpu: Option<Gpu>) -> Result<Self> {
        let gpu = match gpu {
            Some(gpu) => {
                let on_gpu = GpuModel::upload(&gpu, &model)?;
                let lora = adapter.as_ref().map(|a| GpuLora::upload(&gpu, a));
                Some((gpu, on_gpu, lora))
            }
            None => None,
        };
        Ok(Placed {
            model,
            adapter,
            gpu,
        })
    }

    pub fn executor(&self) -> Executor<'_> {
        match &self.gpu {
            Some((gpu, model, lora)) => Executor::Gpu {
                gpu,
                model,
                lora: lora.as_ref(),
            },
            None => Executor::Cpu {
                model: &self.model,
                adapter: self.adapter.as_ref(),
            },
        }
    }
}

/// The keys and values decoded so far, where the executor keeps them.
pub enum Cache {
    Cpu(KvCache),
    Gpu(GpuKvCache),
}

impl Cache {
    /// Forgets every position from `len` on.
    pub fn truncate(&mut self, len: usize) {
        match self {
            Cache::Cpu(c) => c.truncate(len),
            Cache::Gpu(c) => c.truncate(len),
        }
    }
}

impl Executor<'_> {
    /// An empty cache for this executor.
    pub fn cache(&self) -> Cache {
        match *self {
            Executor::Cpu { model, .. } => Cache::Cpu(KvCache::new(model)),
            Executor::Gpu { gpu, model, .. } => Cache::Gpu(GpuKvCache::new(gpu, model)),
        }
    }

    fn config(&self) -> &crate::config::ModelConfig {
        match *self {
            Executor::Cpu { model, .. } => &model.config,
            Executor::Gpu { model, .. } => &model.config,
        }
    }

    /// Feeds `ids` after `cached` (the tokens whose keys and values `cache` holds) and returns the
    /// last one's logits. Where LongRoPE switches to its long factors in this step, every position is
    /// fed again, as transformers' Phi-3 drops its cache there: the cached keys were rotated with the
    /// short factors.
    pub async fn decode_after(
        &self,
        cache: &mut Cache,
        cached: &mut Vec<u32>,
        ids: &[u32],
    ) -> Result<Vec<f32>> {
        if crate::ops::rope::switches_factors(self.config(), cached.len(), ids.len()) {
            // Emptied first, so that a failed step leaves the cache and `cached` agreeing.
            let all: Vec<u32> = cached.iter().chain(ids).copied().collect();
            cache.truncate(0);
            cached.clear();
            let logits = self.decode(cache, &all).await?;
            *cached = all;
            return Ok(logits);
        }
        let logits = self.decode(cache, ids).await?;
        cached.extend_from_slice(ids);
        Ok(logits)
    }

    /// Keeps the part of `cache` (holding `cached`) that serves `prompt` and returns its length: the
    /// common prefix, or nothing where its keys were rotated with LongRoPE's long factors and the
    /// prompt stays below the switch (it needs the short ones throughout).
    pub fn reuse(&self, cache: &mut Cache, cached: &mut Vec<u32>, prompt: &[u32]) -> usize {
        let mut common = reusable_prefix(cached, prompt);
        let config = self.config();
        if crate::ops::rope::uses_long_factors(config, cached.len())
            && !crate::ops::rope::uses_long_factors(config, prompt.len())
        {
            common = 0;
        }
        cache.truncate(common);
        cached.truncate(common);
        common
    }

    /// What runs the decoding, for logs.
    pub fn describe(&self) -> String {
        match self {
            Executor::Cpu { .. } => "CPU".to_string(),
            Executor::Gpu { gpu, .. } => format!("GPU ({})", gpu.info.name),
        }
    }

    /// Σ token cross-entropy over `seq`'s labels and their count, without gradients; `precision` is the
    /// CPU executor's arithmetic.
    pub async fn loss_async(&self, seq: &Sequence, precision: Precision) -> Result<StepLoss> {
        match *self {
            Executor::Cpu { model, adapter } => {
                let options = cpu::StepOptions {
                    grad_scale: 0.0,
                    precision,
                    ..cpu::StepOptions::default()
                };
                cpu::forward_backward_with(model, adapter, None, seq, options, None)
            }
            Executor::Gpu { gpu, model, lora } => {
                crate::exec::gpu::forward_backward_async(gpu, model, lora, None, seq, 0.0).await
            }
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn loss(&self, seq: &Sequence, precision: Precision) -> Result<StepLoss> {
        pollster::block_on(self.loss_async(seq, precision))
    }

    /// Feeds `ids` after the positions in `cache` and returns the last one's logits.
    pub async fn decode(&self, cache: &mut Cache, ids: &[u32]) -> Result<Vec<f32>> {
        match (*self, cache) {
            (Executor::Cpu { model, adapter }, Cache::Cpu(c)) => {
                cpu::decode(model, adapter, c, ids)
            }
            (Executor::Gpu { gpu, model, lora }, Cache::Gpu(c)) => {
                crate::exec::gpu::decode_async(gpu, model, lora, c, ids).await
            }
            _ => Err(crate::error::Error::Invalid(
                "a KV cache of one executor was given to the other".into(),
            )),
        }
    }
}

/// How many leading tokens of `prompt` a cache holding `cached` serves without feeding them again (at
/// least one prompt token is always fed, to get logits).
pub fn reusable_prefix(cached: &[u32], prompt: &[u32]) -> usize {
    cached
        .iter()
        .zip(prompt)
        .take_while(|(a, b)| a == b)
        .count()
        .min(prompt.len().saturating_sub(1))
}

/// The first special token after the answer in a short exchange rendered through the chat template;
/// None where the template cannot render one or closes the turn with plain text.
pub fn turn_end_token(tok: &ChatTokenizer) -> Option<u32> {
    use crate::tokenizer::Message;
    const ANSWER: &str = "Fine, thanks.";
    let exchange = [
        Message::new("user", "How are you?"),
        Message::new("assistant", ANSWER),
    ];
    let text = tok.apply_chat_template(&exchange, false).ok()?;
    let after = text.rfind(ANSWER)? + ANSWER.len();
    let (ids, offsets) = tok.encode_with_offsets(&text, false).ok()?;
    ids.iter()
        .zip(offsets)
        .find(|&(&id, (start, _))| start >= after && tok.is_special(id))
        .map(|(&id, _)| id)
}

/// Continues `prompt` by up to `max_new` tokens, calling `on_token` with each; stops after a token in
/// `stop` (which is returned too), or after the token for which `on_token` breaks (a person
/// interrupting the answer). `cache` may already hold a prefix of `prompt` (a conversation so far);
/// positions it holds beyond the common prefix are dropped.
#[allow(clippy::too_many_arguments)]
pub async fn generate_async(
    executor: Executor<'_>,
    cache: &mut Cache,
    cached: &mut Vec<u32>,
    prompt: &[u32],
    max_new: usize,
    stop: &[u32],
    sampling: &Sampling,
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<Vec<u32>> {
    let common = executor.reuse(cache, cached, prompt);
    let mut rng = Rng::new(sampling.seed);
    let mut logits = executor
        .decode_after(cache, cached, &prompt[common..])
        .await?;
    let mut out = Vec::new();
    for _ in 0..max_new {
        let next = sample(&logits, sampling, cached, &mut rng);
        out.push(next);
        let asked_to_stop = on_token(next).is_break();
        if asked_to_stop || stop.contains(&next) || out.len() == max_new {
            break;
        }
        logits = executor.decode_after(cache, cached, &[next]).await?;
    }
    Ok(out)
}

/// `generate_async`, waited for.
#[cfg(not(target_arch = "wasm32"))]
#[allow(clippy::too_many_arguments)]
pub fn generate(
    executor: Executor<'_>,
    cache: &mut Cache,
    cached: &mut Vec<u32>,
    prompt: &[u32],
    max_new: usize,
    stop: &[u32],
    sampling: &Sampling,
    on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<Vec<u32>> {
    pollster::block_on(generate_async(
        executor, cache, cached, prompt, max_new, stop, sampling, on_token,
    ))
}

/// Greedy continuation of `ids` (the prompt followed by up to `max_new` tokens).
pub async fn greedy_async(
    executor: Executor<'_>,
    ids: &[u32],
    max_new: usize,
    stop: &[u32],
) -> Result<Vec<u32>> {
    let mut cache = executor.cache();
    let new = generate_async(
        executor,
        &mut cache,
        &mut Vec::new(),
        ids,
        max_new,
        stop,
        &Sampling::default(),
        |_| ControlFlow::Continue(()),
    )
    .await?;
    Ok(ids.iter().copied().chain(new).collect())
}

/// A greedy answer: its text without the stop token, and how many tokens were generated (the stop
/// token counted: it was computed like the others).
pub struct Answer {
    pub text: String,
    pub tokens: usize,
}

/// The greedy answer to `question` as a user turn through the chat template, up to `max_new` tokens.
pub async fn answer_async(
    executor: Executor<'_>,
    tok: &ChatTokenizer,
    question: &str,
    max_new: usize,
) -> Result<Answer> {
    let text =
        tok.apply_chat_template(&[crate::tokenizer::Message::new("user", question)], true)?;
    let ids = tok.encode(&text)?;
    let stop = stop_tokens(tok);
    let out = greedy_async(executor, &ids, max_new, &stop).await?;
    let answer: Vec<u32> = out[ids.len()..]
        .iter()
        .copied()
        .filter(|t| !stop.contains(t))
        .collect();
    Ok(Answer {
        text: tok.decode(&answer)?,
        tokens: out.len() - ids.len(),
    })
}

#[cfg(not(target_arch = "wasm32"))]
pub fn answer(
    executor: Executor<'_>,
    tok: &ChatTokenizer,
    question: &str,
    max_new: usize,
) -> Result<Answer> {
    pollster::block_on(answer_async(executor, tok, question, max_new))
}

/// `greedy_async`, waited for.
#[cfg(not(target_arch = "wasm32"))]
pub fn greedy(
    executor: Executor<'_>,
    ids: &[u32],
    max_new: usize,
    stop: &[u32],
) -> Result<Vec<u32>> {
    pollster::block_on(greedy_async(executor, ids, max_new, stop))
}
