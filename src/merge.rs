//! `nibble merge`: folds a LoRA adapter into the base model's weights (W + scale · B·A) and writes a
//! model folder that transformers loads: one model.safetensors in a 16-bit (or f32) dtype, with every
//! other file of the source folder (config, tokenizer, generation config) copied. Tensors are read,
//! merged and written one at a time, so memory stays at about one tensor.
//!
//! A QLoRA adapter learned its update against the 4-bit weights, not the original ones: merged into
//! those (`MergeBase::Quantized`, each decoder linear quantized and dequantized as training loaded it)
//! the merged model computes what the trained one did, where the original weights add the
//! quantization error back (and a LoftQ adapter, which starts at that error, would count it twice).

use crate::error::{Error, Result};
use crate::lora::{LoraAdapter, SavedModules, TokenRows};
use crate::model::ModelSource;
use crate::ops::matmul::{View, matmul_into};
use crate::quant::{QuantSpec, QuantTensor};
use crate::source::FloatDtype;
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;

/// One tensor of the merged model: `read` from the source (the base's values), written as `written`
/// (the source's spelling), known to the adapter as `key` (nibble's name of the tensor it holds).
struct Entry {
    shard: usize,
    read: String,
    key: String,
    written: String,
    shape: Vec<usize>,
    /// A gpt-oss expert stack, read expert by expert from the checkpoint's tensors named beside it
    /// and written back in its layout ([experts, in, out], gate and up interleaved).
    gpt_oss_stack: Option<(crate::config::ExpectedTensor, Vec<String>)>,
}

/// The weights an adapter is merged into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeBase {
    /// The checkpoint's own (PEFT's `merge_and_unload` on a 16-bit base).
    Original,
    /// The decoder linears as the 4-bit form `spec` holds them, the rest as stored.
    Quantized(QuantSpec),
}

/// Merges `adapter` into the model folder `folder` (opened as `source`) and writes the result to
/// `output`, which must not exist yet; `saved` (PEFT's `modules_to_save`) replaces the embedding and
/// output projection, a tied model's becoming two tensors where only one is replaced (config.json's
/// `tie_word_embeddings` then false). `dtype` defaults to the checkpoint's own. `chat` says where the
/// adapter chats and ends text otherwise than its base (`MergedChat::write_into`); `base` says which
/// weights the adapter is added to.
pub fn merge(
    source: &ModelSource,
    folder: &Path,
    (adapter, saved): (&LoraAdapter, &SavedModules),
    chat: &MergedChat,
    output: &Path,
    (dtype, base, max_shard_bytes): (Option<FloatDtype>, MergeBase, u64),
) -> Result<()> {
    let shards = source.shards().ok_or_else(|| {
        let how = match base {
            MergeBase::Original => "",
            // The file holds no tokenizer and config files to copy, and its 4-bit weights are
            // what quantizing its folder gives again.
            MergeBase::Quantized(_) => {
                ": --base-weights quantized quantizes the folder's weights as this file holds them"
            }
        };
        Error::Invalid(format!(
            "{}: merging needs the original model folder (16-bit weights), not a quantized \
             file{how}",
            folder.display()
        ))
    })?;
    if output.exists() {
        return Err(Error::Invalid(format!(
            "{} already exists; merge writes a new folder",
            output.display()
        )));
    }
    // The tensors training held in 4 bits, by nibble's name.
    let quantized: HashMap<String, QuantSpec> = match base {
        MergeBase::Original => HashMap::new(),
        MergeBase::Quantized(spec) => {
            source
                .config
                .check_group_size(spec.group_size)
                .map_err(|msg| Error::Invalid(format!("{}: {msg}", folder.display())))?;
            use crate::config::TensorRole;
            let config = &source.config;
            // A mixture-of-experts layer's experts, under the names the folder may store them
            // by: one tensor per expert, or transformers' stacked one.
            config
                .expected_tensors()
                .into_iter()
                .flat_map(|t| match t.role {
                    TensorRole::LinearWeight(_) => vec![t.name],
                    TensorRole::Experts => {
                        let parts = crate::model::expert_parts(config, &t);
                        std::iter::once(t.name)
                            .chain(parts.into_iter().map(|(name, _)| name))
                            .collect()
                    }
                    _ => Vec::new(),
                })
                .map(|name| (name, spec))
                .collect()
        }
    };
    let mut entries: Vec<Entry> = shards
        .iter()
        .enumerate()
        .flat_map(|(s, shard)| {
            let mut names: Vec<&String> = shard.tensor_names().collect();
            names.sort();
            names.into_iter().map(move |n| Entry {
                shard: s,
                read: n.clone(),
                key: n.clone(),
                // Written in the source's own spelling of each name.
                written: shard.stored_name(n).to_string(),
                shape: shard.info(n).expect("listed").shape.clone(),
                gpt_oss_stack: None,
            })
        })
        // An FP8 checkpoint's scales are folded into its weights.
        .filter(|e| !source.is_float8_companion(&e.read))
        .collect();
    if source.config.moe_family() == Some(crate::config::MoeFamily::GptOss) {
        gpt_oss_stacks(source, &mut entries);
    }
    let dtype = match dtype {
        Some(d) => d,
        None => entries
            .iter()
            .find_map(|e| FloatDtype::of(shards[e.shard].info(&e.read)?.dtype))
            .unwrap_or(FloatDtype::BF16),
    };
    let embed = source.config.tensor("embed_tokens.weight");
    let untie = saved.unties(source.config.tie_word_embeddings);
    if untie {
        // The output projection the tied model read: the base's embedding, as a tensor of its own
        // (in place of any lm_head.weight the folder holds, which a tied model does not read).
        let table = entries
            .iter()
            .find(|e| e.read == embed)
            .ok_or_else(|| Error::Invalid(format!("{}: no {embed} to untie", folder.display())))?;
        // A multimodal checkpoint in the older spelling keeps its text model's tensors under
        // `language_model.`.
        let written = match table.written.starts_with("language_model.") {
            true => "language_model.lm_head.weight",
            false => "lm_head.weight",
        };
        let head = Entry {
            shard: table.shard,
            read: embed.clone(),
            key: "lm_head.weight".into(),
            written: written.into(),
            shape: table.shape.clone(),
            gpt_oss_stack: None,
        };
        match entries.iter_mut().find(|e| e.key == "lm_head.weight") {
            Some(stored) => *stored = head,
            None => entries.push(head),
        }
    }
    // A tied model reads its embedding as its output projection: an lm_head.weight stored beside
    // it (which transformers ignores) would keep the base's rows where the embedding changes.
    if source.config.tie_word_embeddings
        && !untie
        && (saved.embed.is_some() || saved.embed_rows.is_some())
    {
        entries.retain(|e| e.key != "lm_head.weight");
    }
    // Whole modules by nibble's name of the tensor they replace.
    let mut replaced: HashMap<&str, &[f32]> = HashMap::new();
    if let Some((_, values)) = &saved.embed {
        replaced.insert(embed.as_str(), values);
    }
    if let Some((_, values)) = &saved.head {
        replaced.insert("lm_head.weight", values);
    }
    let mut rows: HashMap<&str, &TokenRows> = HashMap::new();
    if let Some(token_rows) = &saved.embed_rows {
        rows.insert(embed.as_str(), token_rows);
    }
    if let Some(token_rows) = &saved.head_rows {
        rows.insert("lm_head.weight", token_rows);
    }
    // Which tensor each LoRA pair merges into, at its module's scale.
    let targets: HashMap<String, (&crate::lora::LoraPair, f32)> = adapter
        .pairs()
        .map(|(path, pair)| {
            let scale = adapter.config.scale_of(path);
            (format!("{path}.weight"), (pair, scale))
        })
        .collect();
    crate::fsutil::write_folder_atomically(output, |tmp| {
        let changed = Changed {
            targets: &targets,
            replaced: &replaced,
            rows: &rows,
            quantized: &quantized,
        };
        write_merged(&entries, source, &changed, tmp, (dtype, max_shard_bytes))
            .and_then(|()| copy_other_files(folder, tmp, dtype, untie))
            .and_then(|()| chat.write_into(folder, tmp))
    })
}

type Targets<'a> = HashMap<String, (&'a crate::lora::LoraPair, f32)>;

/// gpt-oss's expert stacks in place of the tensors the checkpoint stores them in (transformers'
/// [experts, in, out], or the hub's MXFP4 blocks and scales, which the merged folder writes as
/// transformers' layout in 16 bits).
fn gpt_oss_stacks(source: &ModelSource, entries: &mut Vec<Entry>) {
    use crate::config::TensorRole;
    for t in source.config.expected_tensors() {
        if t.role != TensorRole::Experts {
            continue;
        }
        let parts = source.stored_part_names(&t);
        let Some(first) = entries.iter().position(|e| e.read == parts[0]) else {
            // Missing from the folder: reading it names it.
            continue;
        };
        let stored = &entries[first];
        let written = match stored.written.strip_suffix("_blocks") {
            Some(name) if parts.len() > 1 => name.to_string(),
            _ => stored.written.clone(),
        };
        let [rows, inp] = t.shape[..] else {
            unreachable!("a linear's weight is 2-D")
        };
        let experts = source.config.moe.as_ref().map_or(1, |m| m.experts);
        entries[first] = Entry {
            shard: stored.shard,
            read: t.name.clone(),
            key: t.name.clone(),
            written,
            shape: vec![experts, inp, rows / experts],
            gpt_oss_stack: Some((t, parts.clone())),
        };
        entries.retain(|e| !parts[1..].contains(&e.read));
    }
}

/// What a value the merged dtype cannot hold is blamed on.
#[derive(Clone, Copy)]
enum Blame {
    Base,
    Update,
}

/// gpt-oss's expert stack `t` merged into `out` (the checkpoint's layout), experts in parallel
/// (each a transpose and interleave away from the layout its update adds in): quantized as
/// training packed it where `changed` says, `check`ed before and after its LoRA update.
fn merge_gpt_oss_stack(
    source: &ModelSource,
    t: &crate::config::ExpectedTensor,
    changed: &Changed,
    out: &mut [f32],
    check: &(dyn Fn(&[f32], Blame) -> Result<()> + Sync),
) -> Result<()> {
    let stack = source.gpt_oss_experts(t)?;
    let pair = changed.targets.get(&format!("{}.weight", t.name));
    let pairs = pair.map(|&(pair, scale)| crate::ops::moe::ExpertPairs::of(pair, scale));
    out.par_chunks_exact_mut(stack.out * stack.inp)
        .enumerate()
        .try_for_each(|(e, stored)| {
            let mut w = stack.expert(e)?;
            if let Some(&spec) = changed.quantized.get(&t.name) {
                as_quantized(spec, stack.inp, &mut w)
                    .map_err(|err| Error::Invalid(format!("{}: {err}", t.name)))?;
            }
            check(&w, Blame::Base)?;
            if let Some(pairs) = &pairs {
                pairs.add_update(e, (0, stack.out), &mut w);
                check(&w, Blame::Update)?;
            }
            stack.store(&w, stored);
            Ok(())
        })
}

/// Rows of `cols` values replaced by what their 4-bit form `spec` holds, as training loaded them
/// (rows are packed each on its own, so a stack's rows give its experts').
fn as_quantized(spec: QuantSpec, cols: usize, values: &mut [f32]) -> Result<()> {
    let q = QuantTensor::quantize(spec, values.len() / cols, cols, values)?;
    // Row by row: a second f32 copy of the tensor would double the memory a merge holds.
    values
        .par_chunks_mut(cols)
        .enumerate()
        .for_each(|(r, row)| q.dequantize_row(r, row));
    Ok(())
}

/// Where a tensor of a mixture of experts takes its stack's LoRA update: the stack's path (where
/// the adapter keys its pair), the expert (None: every expert, transformers' stacked
/// [experts, out, in]; else the hub's one tensor per expert and projection) and the first row of
/// that expert's B the tensor's rows start at (an expert's up_proj: after its gate_proj's).
fn expert_rows(name: &str, shape: &[usize]) -> Option<(String, Option<usize>, usize)> {
    use crate::config::{EXPERTS_DOWN, EXPERTS_GATE_UP};
    // The experts' module's parent: a layer's `mlp.`, or the layer itself (Gemma 4).
    let (parent, rest) = name.split_once("experts.")?;
    let stack = |which: &str| format!("{parent}{which}");
    match rest {
        "gate_up_proj" => return Some((stack(EXPERTS_GATE_UP), None, 0)),
        "down_proj" => return Some((stack(EXPERTS_DOWN), None, 0)),
        _ => {}
    }
    let (expert, projection) = rest.strip_suffix(".weight")?.split_once('.')?;
    let expert = Some(expert.parse().ok()?);
    match projection {
        "gate_proj" => Some((stack(EXPERTS_GATE_UP), expert, 0)),
        "up_proj" => Some((stack(EXPERTS_GATE_UP), expert, *shape.first()?)),
        "down_proj" => Some((stack(EXPERTS_DOWN), expert, 0)),
        _ => None,
    }
}

/// What the merge changes, by nibble's name of each tensor.
struct Changed<'a> {
    /// The LoRA pairs merged into each weight, at their scales.
    targets: &'a Targets<'a>,
    /// The adapter's saved modules, in place of the base's tensors.
    replaced: &'a HashMap<&'a str, &'a [f32]>,
    /// The adapter's rows, in place of some of the base's.
    rows: &'a HashMap<&'a str, &'a TokenRows>,
    /// Tensors whose 4-bit form's values the update is added to.
    quantized: &'a HashMap<String, QuantSpec>,
}

/// transformers' default largest shard (`save_pretrained`'s `max_shard_size`, 5.x), the Hub's
/// largest file.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 50_000_000_000;

/// The merged tensors' files, as huggingface_hub's `split_state_dict_into_shards_factory` splits a
/// state dict for transformers' `save_pretrained`: in order, a new shard where the next tensor
/// would pass `max_bytes`, and a tensor larger than that alone in its own (which here also closes
/// the shard before it, so that each file holds consecutive tensors). The ranges of `sizes` each
/// file holds.
fn shard_ranges(sizes: &[u64], max_bytes: u64) -> Vec<std::ops::Range<usize>> {
    let mut ranges: Vec<std::ops::Range<usize>> = Vec::new();
    let mut start = 0;
    let mut bytes = 0u64;
    for (i, &size) in sizes.iter().enumerate() {
        if i > start && bytes + size > max_bytes {
            ranges.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += size;
        if size > max_bytes {
            ranges.push(start..i + 1);
            (start, bytes) = (i + 1, 0);
        }
    }
    if start < sizes.len() || ranges.is_empty() {
        ranges.push(start..sizes.len());
    }
    ranges
}

/// Streams the merged tensors into tmp/model.safetensors, one at a time, or into shards of at most
/// `max_shard_bytes` with transformers' index (model.safetensors.index.json) where they need more
/// than one. The writer goes on to the end whatever a tensor gives, so the first failure is kept
/// and returned (the caller then drops the folder).
fn write_merged(
    entries: &[Entry],
    source: &ModelSource,
    changed: &Changed,
    tmp: &Path,
    (dtype, max_shard_bytes): (FloatDtype, u64),
) -> Result<()> {
    let shards = source.shards().expect("a folder");
    let mut failure: Option<Error> = None;
    let names: Vec<(String, Vec<usize>)> = entries
        .iter()
        .map(|e| (e.written.clone(), e.shape.clone()))
        .collect();
    let mut fill = |i: usize, out: &mut [f32]| {
        let entry = &entries[i];
        let name = &entry.key;
        let saved = changed.replaced.get(name.as_str());
        // What the adapter puts in place of the base's values takes the dtype of the tensor it
        // replaces, as PEFT casts it to the base module's (so eval, which keeps the table in
        // its checkpoint dtype, and merge agree).
        let stored_dtype = shards[entry.shard]
            .info(&entry.read)
            .and_then(|info| FloatDtype::of(info.dtype));
        // A base of f32 or bf16 written as f16 can pass f16's range without any adapter, and a
        // huge lora_alpha can pass any type's: the base is checked before its update, so that
        // the message blames the right one.
        let limit = match dtype {
            FloatDtype::F16 => 65504.0,
            FloatDtype::BF16 => 3.3895e38,
            FloatDtype::F32 => f32::MAX,
        };
        let beyond = |values: &[f32]| {
            values
                .iter()
                .copied()
                .find(|v| v.is_nan() || v.abs() > limit)
        };
        let cannot_hold = |v: f32, why: String| {
            Error::Invalid(format!(
                "merging into {name} gives {v}, which {dtype:?} cannot hold: {why}"
            ))
        };
        if let Some((t, parts)) = &entry.gpt_oss_stack {
            let check = |w: &[f32], blame| match (beyond(w), blame) {
                (None, _) => Ok(()),
                (Some(v), Blame::Base) => Err(cannot_hold(
                    v,
                    "the base's own weight: choose a wider --dtype".into(),
                )),
                (Some(v), Blame::Update) => Err(cannot_hold(
                    v,
                    "the adapter's update there is far outside what training gives".into(),
                )),
            };
            if let Err(e) = merge_gpt_oss_stack(source, t, changed, out, &check) {
                failure.get_or_insert(e);
            }
            for part in parts {
                source.release(part);
            }
            return;
        }
        match saved {
            Some(values) => {
                out.copy_from_slice(values);
                if let Some(dtype) = stored_dtype {
                    dtype.round(out);
                }
            }
            None => {
                if let Err(e) = source.read_f32_into(&entry.read, out) {
                    failure.get_or_insert(e);
                    return;
                }
                shards[entry.shard].release(&entry.read);
                // Stacked experts [experts, rows, cols] quantize as their rows.
                if let Some(&spec) = changed.quantized.get(name)
                    && let Some((&cols, lead)) = entry.shape.split_last()
                    && !lead.is_empty()
                    && let Err(e) = as_quantized(spec, cols, out)
                {
                    failure.get_or_insert(Error::tensor(
                        shards[entry.shard].path(),
                        &entry.read,
                        e.to_string(),
                    ));
                    return;
                }
            }
        }
        if let Some(v) = beyond(out) {
            let whose = match saved {
                Some(_) => "the adapter's saved module",
                None => "the base's own weight",
            };
            failure.get_or_insert(cannot_hold(v, format!("{whose}: choose a wider --dtype")));
            return;
        }
        if let Some(token_rows) = changed.rows.get(name.as_str()) {
            if let Some(v) = beyond(&token_rows.values) {
                failure.get_or_insert(cannot_hold(
                    v,
                    format!(
                        "the adapter's rows ({}): choose a wider --dtype",
                        token_rows.key
                    ),
                ));
                return;
            }
            let width = entry.shape[1];
            token_rows.put_into(out, width);
            if let Some(dtype) = stored_dtype {
                for &row in &token_rows.indices {
                    dtype.round(&mut out[row * width..(row + 1) * width]);
                }
            }
        }
        if let Some((path, expert, first)) = expert_rows(name, &entry.shape)
            && let Some(&(pair, scale)) = changed.targets.get(&format!("{path}.weight"))
        {
            let pairs = crate::ops::moe::ExpertPairs::of(pair, scale);
            let (experts, per_expert) = match expert {
                Some(e) => (e..e + 1, out.len()),
                None => (0..pair.experts, out.len() / pair.experts),
            };
            let rows = (first, per_expert / pair.in_features);
            for (e, w) in experts.zip(out.chunks_exact_mut(per_expert)) {
                pairs.add_update(e, rows, w);
            }
            if let Some(v) = beyond(out) {
                failure.get_or_insert(cannot_hold(
                    v,
                    format!(
                        "the adapter's scale there ({scale}) is far outside what training gives"
                    ),
                ));
            }
        }
        if let Some(&(pair, scale)) = changed.targets.get(name) {
            // W [out, in] += scale · B [out, r] · A [r, in]
            matmul_into(
                View::new(&pair.b, pair.out_features, pair.rank),
                View::new(&pair.a, pair.rank, pair.in_features),
                scale,
                out,
                pair.in_features,
                0,
                true,
            );
            // DoRA: each row rescaled to its magnitude, m / ‖W + s·B·A‖ · (W + s·B·A), as PEFT
            // merges it (the norm of the weight being merged into).
            for (row, &m) in out.chunks_exact_mut(pair.in_features).zip(&pair.magnitude) {
                let norm = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
                let factor = (m as f64 / norm) as f32;
                row.iter_mut().for_each(|v| *v *= factor);
            }
            if let Some(v) = beyond(out) {
                failure.get_or_insert(cannot_hold(
                    v,
                    format!(
                        "the adapter's scale there ({scale}, lora_alpha over r {}) is far \
                             outside what training gives",
                        pair.rank
                    ),
                ));
            }
        }
    };
    let sizes: Vec<u64> = names
        .iter()
        .map(|(_, shape)| (shape.iter().product::<usize>() * dtype.size()) as u64)
        .collect();
    let ranges = shard_ranges(&sizes, max_shard_bytes);
    let file_name = |k: usize| match ranges.len() {
        1 => "model.safetensors".to_string(),
        n => format!("model-{:05}-of-{n:05}.safetensors", k + 1),
    };
    for (k, range) in ranges.iter().enumerate() {
        crate::synth::write_safetensors_streaming(
            &tmp.join(file_name(k)),
            dtype,
            &names[range.clone()],
            |j, out| fill(range.start + j, out),
        )?;
    }
    if let Some(e) = failure {
        return Err(e);
    }
    if ranges.len() > 1 {
        let weight_map: serde_json::Map<String, serde_json::Value> = ranges
            .iter()
            .enumerate()
            .flat_map(|(k, range)| names[range.clone()].iter().map(move |(n, _)| (n, k)))
            .map(|(name, k)| (name.clone(), file_name(k).into()))
            .collect();
        let index = serde_json::json!({
            "metadata": {
                "total_parameters": names
                    .iter()
                    .map(|(_, shape)| shape.iter().product::<usize>() as u64)
                    .sum::<u64>(),
                "total_size": sizes.iter().sum::<u64>(),
            },
            "weight_map": weight_map,
        });
        let path = tmp.join("model.safetensors.index.json");
        let text = serde_json::to_string_pretty(&index).expect("json") + "\n";
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// How an adapter chats and ends text otherwise than its base: its chat template with the special
/// token that closes an assistant turn (`generate::turn_end_token`), and the eos token it was trained
/// with (TRL's `eos_token`), with its id.
#[derive(Default)]
pub struct MergedChat {
    pub template: Option<String>,
    pub turn_end: Option<u32>,
    pub eos: Option<(String, u32)>,
}

impl MergedChat {
    /// Writes the template as chat_template.jinja into the merged folder `dir` (transformers and nibble
    /// read it before tokenizer_config.json's), makes the eos token tokenizer_config.json's
    /// `eos_token`, config.json's `eos_token_id` and the first of generation_config.json's
    /// `eos_token_id` (as TRL's SFTTrainer sets them), and the turn's end one of those ids too (as TRL sets a cloned template's), so that
    /// transformers or a server stops where the adapter learned to; the configuration is read from
    /// the model folder `source` (errors name its files).
    fn write_into(&self, source: &Path, dir: &Path) -> Result<()> {
        if let Some(text) = &self.template {
            let path = dir.join(crate::train::ADAPTER_CHAT_TEMPLATE);
            std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        }
        if self.turn_end.is_none() && self.eos.is_none() {
            return Ok(());
        }
        // A JSON object file of a folder: None where it is absent.
        let object = |folder: &Path,
                      name: &str|
         -> Result<Option<serde_json::Map<String, serde_json::Value>>> {
            let path = folder.join(name);
            let Ok(text) = crate::fsutil::read_to_string(&path) else {
                return Ok(None);
            };
            match serde_json::from_str(&text) {
                Ok(serde_json::Value::Object(map)) => Ok(Some(map)),
                Ok(_) => Err(Error::Config {
                    path,
                    msg: "not a JSON object".into(),
                }),
                Err(e) => Err(Error::Config {
                    path,
                    msg: format!("not valid JSON: {e}"),
                }),
            }
        };
        let write = |name: &str, map: &serde_json::Map<String, serde_json::Value>| {
            let path = dir.join(name);
            let text = serde_json::to_string_pretty(map).expect("json");
            std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
        };
        if let Some((token, _)) = &self.eos
            && let Some(mut tokenizer) = object(dir, "tokenizer_config.json")?
        {
            crate::tokenizer::set_eos_token(&mut tokenizer, token);
            write("tokenizer_config.json", &tokenizer)?;
        }
        // The model's own eos id too, in its text model's part where it has one (a multimodal
        // wrapper's), as TRL sets `config.get_text_config().eos_token_id`.
        if let Some((_, id)) = &self.eos
            && let Some(mut config) = object(dir, "config.json")?
        {
            let text = match config.get_mut("text_config") {
                Some(serde_json::Value::Object(text)) => text,
                _ => &mut config,
            };
            text.insert("eos_token_id".into(), (*id).into());
            write("config.json", &config)?;
        }
        let object = |name: &str| object(source, name);
        let config = object("config.json")?.unwrap_or_default();
        let token_id = |key: &str| {
            config
                .get(key)
                .or_else(|| config.get("text_config")?.get(key))
                .filter(|v| !v.is_null())
                .cloned()
        };
        // Without a generation_config.json, transformers takes these from config.json.
        let mut generation = match object("generation_config.json")? {
            Some(generation) => generation,
            None => ["bos_token_id", "eos_token_id", "pad_token_id"]
                .into_iter()
                .filter_map(|key| Some((key.to_string(), token_id(key)?)))
                .collect(),
        };
        let mut eos = match generation
            .get("eos_token_id")
            .cloned()
            .or_else(|| token_id("eos_token_id"))
        {
            Some(serde_json::Value::Array(ids)) => ids,
            Some(serde_json::Value::Null) | None => Vec::new(),
            Some(one) => vec![one],
        };
        let before = eos.len();
        let eos_id = self.eos.as_ref().map(|(_, id)| *id);
        if let Some(id) = eos_id.filter(|id| !eos.contains(&(*id).into())) {
            eos.insert(0, id.into());
        }
        if let Some(id) = self.turn_end.filter(|id| !eos.contains(&(*id).into())) {
            eos.push(id.into());
        }
        if eos.len() == before {
            return Ok(());
        }
        generation.insert("eos_token_id".into(), eos.into());
        write("generation_config.json", &generation)
    }
}

/// Copies the folder's files other than weights; config.json gets the merged weights' dtype, and
/// with `untie` says the embedding and output projection are tensors of their own.
fn copy_other_files(folder: &Path, to: &Path, dtype: FloatDtype, untie: bool) -> Result<()> {
    if !["tokenizer.json", "tokenizer.model"]
        .iter()
        .any(|name| folder.join(name).is_file())
    {
        log::warn!(
            "{} holds no tokenizer.json (nor tokenizer.model), so the merged model has none: add \
             the base's tokenizer to it before loading it with one",
            folder.display()
        );
    }
    let entries = std::fs::read_dir(folder).map_err(|e| Error::io(folder, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(folder, e))?;
        let name = entry.file_name().to_string_lossy().to_string();
        let path = entry.path();
        // Weights in any format, and their indexes, are the unmerged base's: a loader that took
        // them (PyTorch's .bin, where safetensors is not asked for) would run without the adapter.
        let weights = [".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf"]
            .iter()
            .any(|ext| name.ends_with(ext) || name.ends_with(&format!("{ext}.index.json")));
        if !path.is_file() || weights {
            continue;
        }
        if name == "config.json" {
            let text = crate::fsutil::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let mut config: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::Config {
                    path: path.clone(),
                    msg: format!("not valid JSON: {e}"),
                })?;
            if let Some(obj) = config.as_object_mut() {
                // An FP8 checkpoint's weights, and gpt-oss's MXFP4 experts, are written
                // dequantized.
                obj.remove("quantization_config");
                // transformers 4.x reads torch_dtype, 5.x dtype.
                for key in ["torch_dtype", "dtype"] {
                    if obj.contains_key(key) {
                        obj.insert(key.into(), dtype.name().into());
                    }
                }
                if untie {
                    obj.insert("tie_word_embeddings".into(), false.into());
                    // A multimodal model's text model reads its own.
                    if let Some(text) = obj.get_mut("text_config").and_then(|t| t.as_object_mut()) {
                        text.insert("tie_word_embeddings".into(), false.into());
                    }
                }
            }
            let text = serde_json::to_string_pretty(&config).expect("json");
            std::fs::write(to.join(&name), text).map_err(|e| Error::io(to.join(&name), e))?;
        } else {
            std::fs::copy(&path, to.join(&name)).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::shard_ranges;

    /// huggingface_hub's own example (limit 10, sizes 6 6 2 6 2 2 give [6] [6 2] [6 2 2]), a tensor
    /// over the limit alone in its file, and everything in one file where it fits.
    #[test]
    fn shards_split_where_the_hub_splits() {
        assert_eq!(shard_ranges(&[6, 6, 2, 6, 2, 2], 10), [0..1, 1..3, 3..6]);
        assert_eq!(shard_ranges(&[3, 12, 3, 3], 10), [0..1, 1..2, 2..4]);
        assert_eq!(shard_ranges(&[12, 3], 10), [0..1, 1..2]);
        assert_eq!(shard_ranges(&[3, 4, 3], 10), vec![(0..3)]);
        assert_eq!(shard_ranges(&[10, 10], 10), [0..1, 1..2]);
        assert_eq!(shard_ranges(&[], 10), vec![(0..0)]);
    }
}
