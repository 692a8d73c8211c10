//! LoRA adapters in PEFT's layout: for each adapted linear, A [r, in] and B [out, r], and the update
//! y += scale · (dropout(x)·Aᵀ)·Bᵀ with scale = alpha/r (or alpha/√r with rsLoRA); for a parameter
//! PEFT adapts by name (`target_parameters`: a mixture of experts' stacks), one pair of every
//! expert's matrices in its ParamWrapper's layout (`LoraPair`).

use crate::config::{AdaptableParameter, EXPERTS_DOWN, EXPERTS_GATE_UP, ModelConfig};
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::source::ModelFiles;
use serde_json::Value;

/// The largest LoRA rank (wider than any linear of any released model).
pub const MAX_RANK: usize = 1 << 16;

#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub use_rslora: bool,
    /// DoRA (PEFT's `use_dora`): each adapted linear's output rescaled row by row to a trained
    /// magnitude, y = m / ‖W + s·B·A‖ ⊙ (W + s·B·A)·x, the norm held constant in the backward.
    pub use_dora: bool,
    /// PEFT's `target_modules`: module names (or path suffixes), or `all-linear`.
    pub targets: Vec<String>,
    /// PEFT's `target_parameters`: parameters adapted by name (or name suffix) rather than as linear
    /// modules, a mixture of experts' stacked experts (`gate_up_proj`, `down_proj`) and its router
    /// (`gate.weight`). On such a model PEFT turns the MLP's module names and `all-linear` into
    /// these (`LoraConfig::converted_for`).
    pub target_parameters: Vec<String>,
    /// PEFT's `rank_pattern` and `alpha_pattern`: a module's own rank or alpha where an expression
    /// names it (`Patterns::find`), else `r` and `alpha`.
    pub rank_pattern: Patterns<usize>,
    pub alpha_pattern: Patterns<f64>,
}

impl LoraConfig {
    /// The scale of a module that no pattern names: alpha / r (alpha / √r with rsLoRA).
    pub fn scale(&self) -> f32 {
        scale_of(self.alpha, self.r, self.use_rslora)
    }

    /// The rank of the linear at a module path.
    pub fn rank_of(&self, path: &str) -> usize {
        self.rank_pattern
            .find(&self.pattern_key(path))
            .unwrap_or(self.r)
    }

    /// The scale of the linear at a module path, from its own rank and alpha as PEFT's `update_layer`
    /// takes them.
    pub fn scale_of(&self, path: &str) -> f32 {
        let alpha = self
            .alpha_pattern
            .find(&self.pattern_key(path))
            .unwrap_or(self.alpha);
        scale_of(alpha, self.rank_of(path), self.use_rslora)
    }

    /// What PEFT matches the patterns against: a module's path, or an adapted parameter's full
    /// name (the router's `…mlp.gate.weight`, adapted at the module path `…mlp.gate`).
    fn pattern_key<'p>(&self, path: &'p str) -> std::borrow::Cow<'p, str> {
        match !self.target_parameters.is_empty() && crate::config::is_router_path(path) {
            true => format!("{path}.weight").into(),
            false => path.into(),
        }
    }

    /// The configuration as PEFT adapts `model` with it: on a mixture-of-experts model (whose
    /// experts transformers 5 stacks into parameters) the experts' module names become
    /// `target_parameters`, as PEFT's `_convert_peft_config_moe` converts them: `gate_proj` with
    /// `up_proj` the stacked `gate_up_proj` (at twice the rank and alpha, the two projections' pairs
    /// side by side), `down_proj` the stacked `down_proj`, `gate` the router's weight, and
    /// `all-linear` the attention's linears and all three. The dense MLPs of a model's
    /// `mlp_only_layers` lose their names with them and are not adapted, as in PEFT. Not on
    /// Qwen2-MoE (`MoeFamily::peft_converts_targets`). Idempotent.
    /// PEFT adapts parameters without dropout or DoRA and refuses both; so does this.
    pub fn converted_for(&self, model: &ModelConfig) -> Result<LoraConfig> {
        let mut c = self.clone();
        if model.moe.is_some() {
            c.convert_expert_targets(model)?;
        }
        if !c.target_parameters.is_empty() {
            resolve_parameters(model, &c.target_parameters)?;
            let refused = match () {
                _ if c.dropout > 0.0 => Some(format!("LoRA dropout {}", c.dropout)),
                _ if c.use_dora => Some("DoRA".to_string()),
                _ => None,
            };
            // Named as such, or converted from the target modules.
            let otherwise = match self.target_parameters.is_empty() {
                true => "adapt the attention alone: --target-modules q_proj,k_proj,v_proj,o_proj",
                false => "leave them out (no --target-parameters)",
            };
            if let Some(what) = refused {
                return Err(Error::Invalid(format!(
                    "the adapter's target_parameters ({}: a mixture of experts' experts or router) \
                     are adapted without dropout or DoRA, and PEFT refuses {what} there: pass \
                     --lora-dropout 0 (and no --use-dora), or {otherwise}",
                    c.target_parameters.join(", ")
                )));
            }
        }
        Ok(c)
    }

    fn convert_expert_targets(&mut self, model: &ModelConfig) -> Result<()> {
        let Some(moe) = model
            .moe
            .as_ref()
            .filter(|m| m.family.peft_converts_targets())
        else {
            return Ok(());
        };
        let mapping = moe.family.peft_targets();
        let [gate, up, _] = moe.family.projection_names();
        let mut targets = self.targets.clone();
        if targets.iter().any(|t| t == "all-linear") {
            let mut names: Vec<String> = model
                .linear_modules()
                .into_iter()
                .map(|(path, _, _)| path.rsplit('.').next().unwrap_or(&path).to_string())
                .chain(mapping.iter().map(|(old, _)| old.to_string()))
                .collect();
            names.sort();
            names.dedup();
            targets = names;
        }
        let mut remaining = Vec::new();
        let mut fused = Vec::new();
        for t in targets {
            let mapped = mapping
                .iter()
                .find(|(old, _)| t == *old || t.ends_with(&format!(".{old}")));
            match mapped {
                None => remaining.push(t),
                Some((old, new)) => {
                    if !self.target_parameters.iter().any(|p| p == new) {
                        self.target_parameters.push(new.to_string());
                    }
                    if *new == "gate_up_proj" && !fused.contains(old) {
                        fused.push(*old);
                    }
                }
            }
        }
        match fused.len() {
            1 => {
                let (present, missing) = match fused[0] {
                    name if name == gate => (gate, up),
                    _ => (up, gate),
                };
                return Err(Error::Invalid(format!(
                    "target module `{present}` without `{missing}` on a mixture-of-experts model: \
                     the experts hold both in one stacked gate_up_proj, which PEFT adapts whole: \
                     name both"
                )));
            }
            2 => {
                let key = r".*\.gate_up_proj";
                self.rank_pattern = self.rank_pattern.with(key, self.r * 2)?;
                self.alpha_pattern = self.alpha_pattern.with(key, self.alpha * 2.0)?;
            }
            _ => {}
        }
        self.targets = remaining;
        Ok(())
    }

    /// The configuration of a run whose options are `self` and whose initial adapter's are `adapter`:
    /// the adapter's rank, alpha, targets and patterns (its matrices have their shapes: other patterns
    /// asked for are an error), the run's dropout (a training option), and DoRA where either asks for
    /// it (on a plain adapter, the magnitudes then start from its update, `init_magnitudes`, so that
    /// the run starts where the adapter is).
    pub fn with_initial(
        &self,
        adapter: &LoraConfig,
        linears: &[(String, usize, usize)],
    ) -> Result<LoraConfig> {
        let differ = |what: &str| {
            Error::Invalid(format!(
                "--lora-{what}-pattern differs from the initial adapter's, whose matrices have its \
                 ranks: leave it out to take the adapter's"
            ))
        };
        if !self.rank_pattern.is_empty() && self.rank_pattern != adapter.rank_pattern {
            return Err(differ("rank"));
        }
        if !self.alpha_pattern.is_empty() && self.alpha_pattern != adapter.alpha_pattern {
            return Err(differ("alpha"));
        }
        let sorted = |names: &[String]| {
            let mut names = names.to_vec();
            names.sort();
            names
        };
        if !self.target_parameters.is_empty()
            && sorted(&self.target_parameters) != sorted(&adapter.target_parameters)
        {
            return Err(Error::Invalid(format!(
                "--target-parameters ({}) differs from the initial adapter's ({}), whose matrices \
                 are what trains: leave it out to take the adapter's",
                self.target_parameters.join(","),
                match adapter.target_parameters.is_empty() {
                    true => "none".to_string(),
                    false => adapter.target_parameters.join(","),
                }
            )));
        }
        let shape = |c: &LoraConfig| {
            // PEFT writes target_modules from a set: their order says nothing.
            let mut targets = c.targets.clone();
            targets.sort();
            format!(
                "r {}, alpha {}{} on {}",
                c.r,
                c.alpha,
                if c.use_rslora { " (rsLoRA)" } else { "" },
                targets.join(", ")
            )
        };
        // Targets compared as the modules they name (`all-linear` and a list of every linear are
        // the same run), else as written.
        let modules = |c: &LoraConfig| {
            resolve_among(linears.to_vec(), &c.targets)
                .ok()
                .map(|found| {
                    let mut paths: Vec<String> = found.into_iter().map(|(p, _, _)| p).collect();
                    paths.sort();
                    paths
                })
        };
        let same_modules = match (modules(self), modules(adapter)) {
            (Some(ours), Some(theirs)) => ours == theirs,
            _ => {
                let (mut ours, mut theirs) = (self.targets.clone(), adapter.targets.clone());
                ours.sort();
                theirs.sort();
                ours == theirs
            }
        };
        let scale = |c: &LoraConfig| (c.r, c.alpha.to_bits(), c.use_rslora);
        if !same_modules || scale(self) != scale(adapter) {
            // Worth a warning where the options asked for a shape; left at the defaults, they
            // asked for none.
            let defaults = LoraConfig::default();
            let asked = scale(self) != scale(&defaults) || self.targets != defaults.targets;
            let level = match asked {
                true => log::Level::Warn,
                false => log::Level::Info,
            };
            log::log!(
                level,
                "--init-adapter: training the adapter's own {} (its matrices have that shape), not \
                 the options' {}",
                shape(adapter),
                shape(self)
            );
        }
        Ok(LoraConfig {
            dropout: self.dropout,
            use_dora: adapter.use_dora || self.use_dora,
            ..adapter.clone()
        })
    }

    /// Whether some module's rank or alpha differs from `r` and `alpha`.
    pub fn has_patterns(&self) -> bool {
        !(self.rank_pattern.is_empty() && self.alpha_pattern.is_empty())
    }
}

fn scale_of(alpha: f64, r: usize, use_rslora: bool) -> f32 {
    if use_rslora {
        (alpha / (r as f64).sqrt()) as f32
    } else {
        (alpha / r as f64) as f32
    }
}

/// PEFT's `rank_pattern` or `alpha_pattern`: (regular expression, value) in the order given. The first
/// expression that matches the whole of a module path or of its end after a dot (PEFT's
/// `re.match(rf"(.*\.)?({key})$", path)`) gives the module's value.
#[derive(Clone, Debug)]
pub struct Patterns<T> {
    entries: Vec<(String, T, regex::Regex)>,
}

impl<T: Copy> Patterns<T> {
    /// The patterns of (expression, value) pairs; an expression that does not compile is an error
    /// naming it.
    pub fn new(entries: Vec<(String, T)>) -> std::result::Result<Self, String> {
        let entries = entries
            .into_iter()
            .map(|(key, value)| {
                let anchored = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
                    .map_err(|e| format!("`{key}` is not a regular expression: {e}"))?;
                Ok((key, value, anchored))
            })
            .collect::<std::result::Result<_, String>>()?;
        Ok(Patterns { entries })
    }

    /// The patterns with `key`'s value set to `value` (a key already there keeps its place, as in
    /// the dict PEFT sets it in).
    pub fn with(&self, key: &str, value: T) -> Result<Self> {
        let mut entries: Vec<(String, T)> =
            self.entries().map(|(k, v)| (k.to_string(), v)).collect();
        match entries.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => entries.push((key.to_string(), value)),
        }
        Self::new(entries).map_err(Error::Invalid)
    }

    /// The value of the first expression that names `path`.
    pub fn find(&self, path: &str) -> Option<T> {
        self.entries
            .iter()
            .find(|(_, _, anchored)| anchored.is_match(path))
            .map(|(_, value, _)| *value)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// (expression, value) in order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, T)> {
        self.entries
            .iter()
            .map(|(key, value, _)| (key.as_str(), *value))
    }
}

impl<T: Copy + serde::Serialize> Patterns<T> {
    /// As PEFT writes it: a JSON object in the patterns' order.
    pub fn to_json(&self) -> Value {
        Value::Object(
            self.entries()
                .map(|(key, value)| (key.to_string(), serde_json::json!(value)))
                .collect(),
        )
    }
}

impl<T: Copy + serde::de::DeserializeOwned> Patterns<T> {
    /// From a JSON object of expression to value (`what` names the values in errors).
    pub fn from_json(v: &Value, what: &str) -> std::result::Result<Self, String> {
        let Value::Object(map) = v else {
            return Err(format!(
                "must be an object of module expressions to {what}, got {v}"
            ));
        };
        let entries = map
            .iter()
            .map(|(key, value)| {
                serde_json::from_value(value.clone())
                    .map(|value| (key.clone(), value))
                    .map_err(|_| format!("`{key}`: expected {what}, got {value}"))
            })
            .collect::<std::result::Result<_, String>>()?;
        Self::new(entries)
    }
}

impl Patterns<usize> {
    /// `--lora-rank-pattern`: a JSON object of module expressions to ranks.
    pub fn parse_ranks(text: &str) -> std::result::Result<Self, String> {
        let ranks = parse_pattern(text, "a positive rank")?;
        if let Some((key, _)) = ranks.entries().find(|&(_, r)| !(1..=MAX_RANK).contains(&r)) {
            return Err(format!("`{key}`: ranks must be from 1 to {MAX_RANK}"));
        }
        Ok(ranks)
    }
}

impl Patterns<f64> {
    /// `--lora-alpha-pattern`: a JSON object of module expressions to alphas.
    pub fn parse_alphas(text: &str) -> std::result::Result<Self, String> {
        parse_pattern(text, "a number")
    }
}

fn parse_pattern<T: Copy + serde::de::DeserializeOwned>(
    text: &str,
    what: &str,
) -> std::result::Result<Patterns<T>, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| {
        format!("a JSON object of module expressions to values, such as '{{\"q_proj\": 16}}': {e}")
    })?;
    Patterns::from_json(&v, what)
}

impl<T: Copy + serde::Serialize> serde::Serialize for Patterns<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.entries.len()))?;
        for (key, value) in self.entries() {
            map.serialize_entry(key, &value)?;
        }
        map.end()
    }
}

impl<'de, T: Copy + serde::de::DeserializeOwned> serde::Deserialize<'de> for Patterns<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        // Through a JSON value, which keeps the entries in the order written.
        let v = Value::deserialize(d)?;
        Patterns::from_json(&v, "a value").map_err(serde::de::Error::custom)
    }
}

impl<T> Default for Patterns<T> {
    fn default() -> Self {
        Patterns {
            entries: Vec::new(),
        }
    }
}

// The compiled expressions follow from the keys.
impl<T: PartialEq> PartialEq for Patterns<T> {
    fn eq(&self, other: &Self) -> bool {
        self.entries.len() == other.entries.len()
            && self
                .entries
                .iter()
                .zip(&other.entries)
                .all(|(a, b)| a.0 == b.0 && a.1 == b.1)
    }
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            use_rslora: false,
            use_dora: false,
            targets: vec!["all-linear".to_string()],
            target_parameters: Vec::new(),
            rank_pattern: Patterns::default(),
            alpha_pattern: Patterns::default(),
        }
    }
}

/// One adapted linear's pair of matrices, row-major; or the pairs of a stack of experts, in PEFT's
/// `ParamWrapper` layout: expert e's A is rows e·rank.. of A, its B the columns k·experts + e of B.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPair {
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
    /// Experts stacked in the adapted parameter (1 for a linear).
    pub experts: usize,
    /// [experts · rank, in_features]
    pub a: Vec<f32>,
    /// [out_features, rank · experts]
    pub b: Vec<f32>,
    /// DoRA's magnitude [out_features] (PEFT's `lora_magnitude_vector`); empty without DoRA.
    pub magnitude: Vec<f32>,
    /// The token ids whose rows of the table at this module path (the embedding, the output
    /// projection) are trained, in place of LoRA matrices (PEFT's `trainable_token_indices`); empty
    /// for a linear's pair.
    pub token_ids: Vec<usize>,
    /// Those rows, [token_ids, in_features] (PEFT's `trainable_tokens_delta`, which holds the rows'
    /// values, not differences).
    pub rows: Vec<f32>,
    /// gpt-oss's gate_up stack: PEFT's B interleaves each gate row with its up row, as the
    /// checkpoint's columns; nibble's B holds the gate rows first, as its weights (`peft_factor`).
    pub peft_interleaved: bool,
}

/// A trained tensor of an adapted linear.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Factor {
    A,
    B,
    /// DoRA's magnitude vector.
    Magnitude,
    /// Trained rows of a table (`LoraPair::rows`).
    Rows,
}

impl Factor {
    /// PEFT's name for it in a module's tensor keys.
    pub fn peft_name(self) -> &'static str {
        match self {
            Factor::A => "lora_A",
            Factor::B => "lora_B",
            Factor::Magnitude => "lora_magnitude_vector",
            Factor::Rows => "token_adapter.trainable_tokens_delta",
        }
    }
}

impl LoraPair {
    fn zeros(rank: usize, in_features: usize, out_features: usize) -> Self {
        Self::zeros_stacked(rank, in_features, out_features, 1)
    }

    fn zeros_stacked(rank: usize, in_features: usize, out_features: usize, experts: usize) -> Self {
        LoraPair {
            rank,
            in_features,
            out_features,
            experts,
            a: vec![0.0; experts * rank * in_features],
            b: vec![0.0; out_features * rank * experts],
            magnitude: Vec::new(),
            token_ids: Vec::new(),
            rows: Vec::new(),
            peft_interleaved: false,
        }
    }

    /// Trained rows `token_ids` of a table `width` wide, starting as `rows`.
    pub fn token_rows(token_ids: Vec<usize>, width: usize, rows: Vec<f32>) -> Self {
        assert_eq!(rows.len(), token_ids.len() * width, "token_rows: rows");
        LoraPair {
            token_ids,
            rows,
            ..Self::zeros(0, width, 0)
        }
    }

    /// Whether it trains rows of a table rather than a linear's matrices.
    pub fn is_token_rows(&self) -> bool {
        !self.token_ids.is_empty()
    }

    /// Zeros of this pair's shapes, a magnitude included where it has one.
    pub fn zeros_like(&self) -> Self {
        LoraPair {
            magnitude: vec![0.0; self.magnitude.len()],
            token_ids: self.token_ids.clone(),
            rows: vec![0.0; self.rows.len()],
            peft_interleaved: self.peft_interleaved,
            ..Self::zeros_stacked(self.rank, self.in_features, self.out_features, self.experts)
        }
    }

    /// A factor as PEFT's file holds it.
    pub fn peft_factor(&self, f: Factor) -> std::borrow::Cow<'_, [f32]> {
        let width = self.rank * self.experts;
        match f {
            Factor::B if self.peft_interleaved => {
                crate::model::interleave_rows(&self.b, self.out_features, width).into()
            }
            _ => self.factor(f).into(),
        }
    }

    /// Sets a factor from PEFT's file's values (`peft_factor`'s inverse).
    fn set_from_peft(&mut self, f: Factor, values: Vec<f32>) {
        let width = self.rank * self.experts;
        *self.factor_mut(f) = match f {
            Factor::B if self.peft_interleaved => {
                crate::model::deinterleave_rows(&values, self.out_features, width)
            }
            _ => values,
        };
    }

    /// The tensors it trains: A and B, and the magnitude under DoRA; or a table's rows.
    pub fn factors(&self) -> impl Iterator<Item = Factor> + use<> {
        let (dora, rows) = (!self.magnitude.is_empty(), self.is_token_rows());
        [Factor::A, Factor::B, Factor::Magnitude, Factor::Rows]
            .into_iter()
            .filter(move |f| match f {
                Factor::Rows => rows,
                Factor::Magnitude => dora && !rows,
                Factor::A | Factor::B => !rows,
            })
    }

    pub fn factor(&self, f: Factor) -> &[f32] {
        match f {
            Factor::A => &self.a,
            Factor::B => &self.b,
            Factor::Magnitude => &self.magnitude,
            Factor::Rows => &self.rows,
        }
    }

    pub fn factor_mut(&mut self, f: Factor) -> &mut Vec<f32> {
        match f {
            Factor::A => &mut self.a,
            Factor::B => &mut self.b,
            Factor::Magnitude => &mut self.magnitude,
            Factor::Rows => &mut self.rows,
        }
    }

    /// A factor's shape as PEFT stores it.
    pub fn shape(&self, f: Factor) -> Vec<usize> {
        match f {
            Factor::A => vec![self.experts * self.rank, self.in_features],
            Factor::B => vec![self.out_features, self.rank * self.experts],
            Factor::Magnitude => vec![self.out_features],
            Factor::Rows => vec![self.token_ids.len(), self.in_features],
        }
    }
}

/// The adapters of a whole model: one pair per adapted linear, by module path
/// (`model.layers.3.self_attn.q_proj`), in the model's order, then the tables whose token rows it
/// trains (`model.embed_tokens`, `lm_head`).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraAdapter {
    pub config: LoraConfig,
    pub modules: Vec<(String, LoraPair)>,
}

/// How a new adapter's matrices start (PEFT's `init_lora_weights`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoraInit {
    /// A random (Kaiming-uniform), B zero: the adapted model starts as the base (PEFT's `true`).
    #[default]
    #[value(alias = "true")]
    Default,
    /// LoftQ: B·A starts as the best rank-r approximation of each weight's 4-bit quantization error
    /// (`lowrank::loftq`), so training starts from the original weights rather than their 4-bit form.
    Loftq,
}

serde_as_value_enum!(LoraInit);

/// PEFT's LoraConfig `r` and `lora_alpha` where a config leaves them out.
pub const PEFT_DEFAULT_R: usize = 8;

/// PEFT's tensor name for one of a linear's LoRA matrices (`which` is "lora_A" or "lora_B").
pub fn peft_key(path: &str, which: &str) -> String {
    format!("base_model.model.{path}.{which}.weight")
}

/// PEFT's tensor name for a factor of the linear at `path` (the magnitude's has no `.weight`).
pub fn factor_key(path: &str, f: Factor) -> String {
    match f {
        Factor::Magnitude | Factor::Rows => format!("base_model.model.{path}.{}", f.peft_name()),
        _ => peft_key(path, f.peft_name()),
    }
}

/// A PEFT pattern as Python's `re.fullmatch` applies it: matching a whole module path.
fn whole_match(pattern: &str) -> std::result::Result<regex::Regex, regex::Error> {
    regex::Regex::new(&format!("^(?:{pattern})$"))
}

/// The module paths whose lora_A matrices an adapter folder's weights hold, from the file's header
/// (as PEFT saved them; a multimodal model's may be in an older spelling); None where the file does
/// not open.
#[cfg(not(target_arch = "wasm32"))]
pub fn saved_module_paths(dir: &std::path::Path) -> Option<Vec<String>> {
    let file = crate::source::SafetensorsFile::open(&dir.join("adapter_model.safetensors")).ok()?;
    let paths: Vec<String> = file
        .tensor_names()
        .filter_map(|n| {
            let saved = n
                .strip_prefix("base_model.model.")?
                .strip_suffix(".lora_A.weight")?;
            Some(crate::model::multimodal_name(saved).unwrap_or_else(|| saved.to_string()))
        })
        .collect();
    (!paths.is_empty()).then_some(paths)
}

/// An adapter_config.json's `target_modules` when it names modules (a list, or `all-linear`);
/// None for a pattern, which only the adapter's weights resolve (`LoraAdapter::load_peft`).
pub fn targets_of_json(value: &Value) -> Option<Vec<String>> {
    match value {
        Value::Array(a) => a.iter().map(|m| m.as_str().map(str::to_string)).collect(),
        Value::String(s) if s == "all-linear" => Some(vec![s.clone()]),
        _ => None,
    }
}

/// Whether a module path is named by a PEFT `target_modules` entry: the path itself or its last
/// components (`q_proj`, `self_attn.q_proj`, `model.layers.3.self_attn.q_proj`), as PEFT matches a list.
pub fn targets_module(target: &str, path: &str) -> bool {
    path == target || path.ends_with(&format!(".{target}"))
}

/// Refuses a target module naming a mixture's router, with what to do instead: transformers 4 held
/// the routers as linears (`mlp.gate`), and PEFT's adapters of that time name them so; transformers
/// 5 holds a weight without a linear around it.
fn refuse_router_modules(model: &ModelConfig, targets: &[String]) -> Result<()> {
    let linears = model.linear_modules();
    let router = targets.iter().find(|t| {
        t.rsplit('.').next() == Some("gate")
            && !linears.iter().any(|(p, _, _)| targets_module(t, p))
    });
    if let Some(t) = router
        && model.moe.is_some()
        && resolve_parameters(model, &["gate.weight".to_string()]).is_ok()
    {
        return Err(Error::Invalid(format!(
            "target module `{t}`: a mixture of experts' router is a parameter, not a linear layer, \
             since transformers 5: adapt it with --target-parameters gate.weight (an adapter saved \
             with transformers 4 that names it needs PEFT's conversion for this family, which PEFT \
             has not: train it again)"
        )));
    }
    Ok(())
}

/// What an adapter adapts: linears (module path, out, in) and parameters adapted by name.
pub type Targets = (Vec<(String, usize, usize)>, Vec<AdaptableParameter>);

/// The adapted linears of `model` for `targets` (PEFT's list semantics; `all-linear` is every linear
/// layer but the output projection): their module paths and (out, in) shapes, in the model's order;
/// and the parameters adapted by name: `target_parameters`, and those PEFT turns the targets into
/// (`LoraConfig::converted_for`). A target that names nothing is an error that lists the names
/// that work.
pub fn resolve_targets(
    model: &ModelConfig,
    targets: &[String],
    target_parameters: &[String],
) -> Result<Targets> {
    let config = LoraConfig {
        targets: targets.to_vec(),
        target_parameters: target_parameters.to_vec(),
        dropout: 0.0,
        ..LoraConfig::default()
    }
    .converted_for(model)?;
    refuse_router_modules(model, &config.targets)?;
    let linears = model.linear_modules();
    Ok((
        resolve_among(linears, &config.targets)?,
        resolve_parameters(model, &config.target_parameters)?,
    ))
}

/// The parameters of `model` that `target_parameters` names (each entry a parameter's full name or
/// its last components, as PEFT matches them), in the model's order.
pub fn resolve_parameters(
    model: &ModelConfig,
    target_parameters: &[String],
) -> Result<Vec<AdaptableParameter>> {
    let params = model.adaptable_parameters();
    let named = |t: &str, p: &AdaptableParameter| targets_module(t, &p.name);
    if let Some(t) = target_parameters
        .iter()
        .find(|t| !params.iter().any(|p| named(t, p)))
    {
        let mut names: Vec<&str> = params
            .iter()
            .map(|p| {
                p.name
                    .rsplit_once(".mlp.")
                    .map_or(p.name.as_str(), |(_, n)| n)
            })
            .collect();
        names.sort();
        names.dedup();
        return Err(Error::Invalid(format!(
            "target_parameters: `{t}` names no parameter nibble adapts in this model (those it \
             adapts: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        )));
    }
    Ok(params
        .into_iter()
        .filter(|p| target_parameters.iter().any(|t| named(t, p)))
        .collect())
}

/// The module path nibble adapts a parameter at: the router's weight at its module (PEFT keys its
/// pair there, `…mlp.gate.lora_A.weight`), a stack of experts at the parameter itself.
pub fn parameter_path(name: &str) -> &str {
    name.strip_suffix(".weight").unwrap_or(name)
}

/// `resolve_targets` over a model's adaptable linears (module path, out, in); `all-linear` takes every
/// one of them.
pub fn resolve_among(
    linears: Vec<(String, usize, usize)>,
    targets: &[String],
) -> Result<Vec<(String, usize, usize)>> {
    let all = targets.iter().any(|t| t == "all-linear");
    for t in targets.iter().filter(|t| *t != "all-linear") {
        if !linears.iter().any(|(path, _, _)| targets_module(t, path)) {
            let mut names: Vec<&str> = linears
                .iter()
                .map(|(path, _, _)| path.rsplit('.').next().unwrap_or(path))
                .collect();
            names.sort();
            names.dedup();
            return Err(Error::Invalid(format!(
                "target module `{t}` names no linear layer of this model (its linear layers: {}, \
                 or all-linear; a longer path such as {} picks one)",
                names.join(", "),
                linears.first().map_or("", |(p, _, _)| p.as_str())
            )));
        }
    }
    Ok(linears
        .into_iter()
        .filter(|(path, _, _)| all || targets.iter().any(|t| targets_module(t, path)))
        .collect())
}

impl LoraAdapter {
    fn with_pairs(
        (linears, parameters): Targets,
        config: LoraConfig,
        mut make: impl FnMut(usize, usize, usize, usize) -> LoraPair,
    ) -> Result<Self> {
        let interleaved: Vec<String> = parameters
            .iter()
            .filter(|p| p.peft_interleaved)
            .map(|p| parameter_path(&p.name).to_string())
            .collect();
        let targeted: Vec<(String, usize, usize, usize)> = resolve_among(linears, &config.targets)?
            .into_iter()
            .map(|(path, out, inp)| (path, out, inp, 1))
            .chain(parameters.into_iter().map(|p| {
                let path = parameter_path(&p.name).to_string();
                (path, p.out, p.inp, p.experts)
            }))
            .collect();
        for (what, keys) in [
            (
                "rank",
                config.rank_pattern.entries().map(|(k, _)| k).collect(),
            ),
            (
                "alpha",
                config
                    .alpha_pattern
                    .entries()
                    .map(|(k, _)| k)
                    .collect::<Vec<_>>(),
            ),
        ] {
            for key in keys {
                let Ok(alone) = Patterns::new(vec![(key.to_string(), ())]) else {
                    continue;
                };
                if !targeted
                    .iter()
                    .any(|(path, _, _, _)| alone.find(&config.pattern_key(path)).is_some())
                {
                    log::warn!("the {what} pattern `{key}` names no module the adapter targets");
                }
            }
        }
        let modules = targeted
            .into_iter()
            .map(|(path, out, inp, experts)| {
                let mut pair = make(config.rank_of(&path), inp, out, experts);
                pair.peft_interleaved = interleaved.contains(&path);
                (path, pair)
            })
            .collect();
        Ok(LoraAdapter { config, modules })
    }

    /// PEFT's default initialisation: A ~ kaiming_uniform(a=√5), i.e. U(−1/√in, 1/√in); B = 0.
    /// Adapted parameters (`target_parameters`) start the same way, each expert's A over its own
    /// inputs.
    pub fn init(model: &ModelConfig, config: LoraConfig, rng: &mut Rng) -> Result<Self> {
        let config = config.converted_for(model)?;
        let parameters = resolve_parameters(model, &config.target_parameters)?;
        Self::init_with((model.linear_modules(), parameters), config, rng)
    }

    /// DoRA's initial magnitudes where `config.use_dora` asks for them and the pairs have none: each
    /// output's norm ‖W + s·B·A‖ with `weight(path)` the frozen weight as the model computes with it,
    /// as PEFT's `DoraLinearLayer.update_layer` sets them (from the dequantized weight).
    pub fn init_magnitudes<'w>(
        &mut self,
        mut weight: impl FnMut(&str) -> Result<&'w crate::model::LinearWeight>,
    ) -> Result<()> {
        if !self.config.use_dora {
            return Ok(());
        }
        for (path, pair) in &mut self.modules {
            if pair.magnitude.is_empty() && !pair.is_token_rows() {
                let scale = self.config.scale_of(path);
                let norms = crate::ops::dora::row_norms(
                    weight(path)?,
                    (&pair.a, &pair.b),
                    (pair.rank, scale),
                );
                pair.magnitude = norms.into_iter().map(|n| n as f32).collect();
            }
        }
        Ok(())
    }

    /// `init` over a model's adaptable linears (module path, out, in).
    pub fn init_among(
        linears: Vec<(String, usize, usize)>,
        config: LoraConfig,
        rng: &mut Rng,
    ) -> Result<Self> {
        Self::init_with((linears, Vec::new()), config, rng)
    }

    fn init_with(targets: Targets, config: LoraConfig, rng: &mut Rng) -> Result<Self> {
        Self::with_pairs(targets, config, |r, inp, out, experts| {
            let mut pair = LoraPair::zeros_stacked(r, inp, out, experts);
            let bound = 1.0 / (inp as f64).sqrt();
            for a in pair.a.iter_mut() {
                *a = ((rng.uniform() * 2.0 - 1.0) * bound) as f32;
            }
            pair
        })
    }

    /// Zeros of the same shapes (a gradient accumulator).
    pub fn zeros_like(&self) -> Self {
        LoraAdapter {
            config: self.config.clone(),
            modules: self
                .modules
                .iter()
                .map(|(path, p)| (path.clone(), p.zeros_like()))
                .collect(),
        }
    }

    /// PEFT's tensor name for a factor of the pair at `path`: `factor_key`'s, but a layer's stacked
    /// experts key their pairs at the experts module, which PEFT wraps once per adapted parameter in
    /// the module's order: gate_up_proj's pair under `base_layer` when down_proj's wraps it.
    pub fn saved_key(&self, path: &str, f: Factor) -> String {
        // `parent` is the experts module's: a layer's `mlp.`, or the layer (Gemma 4).
        if let Some(parent) = path.strip_suffix(EXPERTS_GATE_UP) {
            let module = format!("{parent}experts");
            return match self.pair(&format!("{parent}{EXPERTS_DOWN}")) {
                Some(_) => factor_key(&format!("{module}.base_layer"), f),
                None => factor_key(&module, f),
            };
        }
        if let Some(parent) = path.strip_suffix(EXPERTS_DOWN) {
            return factor_key(&format!("{parent}experts"), f);
        }
        factor_key(path, f)
    }

    /// The pair at `path` (a linear's module, a stack of experts' parameter), if it is adapted.
    pub fn pair(&self, path: &str) -> Option<&LoraPair> {
        self.modules.iter().find(|(p, _)| p == path).map(|(_, p)| p)
    }

    /// (module path, pair) of every adapted linear.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &LoraPair)> {
        self.trained().filter(|(_, p)| !p.is_token_rows())
    }

    pub fn pairs_mut(&mut self) -> impl Iterator<Item = (&str, &mut LoraPair)> {
        self.trained_mut().filter(|(_, p)| !p.is_token_rows())
    }

    /// (module path, pair) of everything trained: the linears' pairs and the tables' token rows.
    pub fn trained(&self) -> impl Iterator<Item = (&str, &LoraPair)> {
        self.modules.iter().map(|(path, p)| (path.as_str(), p))
    }

    pub fn trained_mut(&mut self) -> impl Iterator<Item = (&str, &mut LoraPair)> {
        self.modules.iter_mut().map(|(path, p)| (path.as_str(), p))
    }

    /// (module path of the table, its trained rows).
    pub fn token_rows(&self) -> impl Iterator<Item = (&str, &LoraPair)> {
        self.trained().filter(|(_, p)| p.is_token_rows())
    }

    pub fn parameter_count(&self) -> usize {
        self.trained()
            .map(|(_, p)| p.a.len() + p.b.len() + p.magnitude.len() + p.rows.len())
            .sum()
    }

    /// Adds trained rows `token_ids` of the table at `path` (`model.embed_tokens`, `lm_head`), each
    /// starting as `rows(id)` gives it.
    pub fn add_token_rows(
        &mut self,
        path: &str,
        token_ids: Vec<usize>,
        width: usize,
        mut row: impl FnMut(usize, &mut [f32]),
    ) {
        let mut rows = vec![0f32; token_ids.len() * width];
        for (&id, out) in token_ids.iter().zip(rows.chunks_exact_mut(width)) {
            row(id, out);
        }
        let pair = LoraPair::token_rows(token_ids, width, rows);
        self.modules.push((path.to_string(), pair));
    }

    /// Moves the token rows `saved` read into the adapter, to train on: the embedding's, and the
    /// output projection's of an untied model (a tied model's output projection reads the
    /// embedding's; rows of its own would untie it, which training does not do).
    fn train_saved_rows(
        &mut self,
        saved: &mut SavedModules,
        model: &ModelConfig,
        weights: &std::path::Path,
    ) -> Result<()> {
        if saved.head_rows.is_some() && model.tie_word_embeddings {
            return Err(Error::Invalid(format!(
                "{}: `trainable_token_indices` gives the tied output projection rows of its own, \
                 which untie it from the embedding: nibble evaluates, generates with and merges \
                 such an adapter, but trains the rows a tied model's two tables share",
                weights.display()
            )));
        }
        for rows in [saved.embed_rows.take(), saved.head_rows.take()]
            .into_iter()
            .flatten()
        {
            let path = rows
                .key
                .strip_prefix("base_model.model.")
                .and_then(|k| k.strip_suffix(".token_adapter.trainable_tokens_delta"))
                .expect("keys_ending found it by this suffix");
            let pair = LoraPair::token_rows(rows.indices, model.hidden_size, rows.values);
            self.modules.push((path.to_string(), pair));
        }
        Ok(())
    }

    /// Loads a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) for `model`, to
    /// train on, its token rows (`trainable_token_indices`) among what it trains: an adapter with
    /// whole modules beside its matrices (`modules_to_save`) is refused, as nibble trains LoRA
    /// matrices and token rows only.
    pub fn load_peft(files: &ModelFiles, model: &ModelConfig) -> Result<Self> {
        Self::load_peft_inner(files, model, false).map(|(adapter, _)| adapter)
    }

    /// `load_peft` for running or merging the adapter: with the embedding and output projection it
    /// saved whole (PEFT's `modules_to_save`), which replace the base's.
    pub fn load_peft_with_modules(
        files: &ModelFiles,
        model: &ModelConfig,
    ) -> Result<(Self, SavedModules)> {
        Self::load_peft_inner(files, model, true)
    }

    fn load_peft_inner(
        files: &ModelFiles,
        model: &ModelConfig,
        keep_modules: bool,
    ) -> Result<(Self, SavedModules)> {
        let cfg_name = "adapter_config.json";
        let cfg_path = files.display_path(cfg_name);
        let bad = |msg: String| Error::Config {
            path: cfg_path.clone(),
            msg,
        };
        let text = files.read_string(cfg_name)?.ok_or_else(|| {
            bad("missing: a PEFT adapter folder needs adapter_config.json".into())
        })?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        if let Some(t) = v.get("peft_type").and_then(Value::as_str)
            && t != "LORA"
        {
            return Err(bad(format!("peft_type `{t}` is not LORA")));
        }
        // A switch written otherwise than as true or false is a file no PEFT wrote: guessing its
        // meaning would merge or train at another scale.
        let switch = |key: &str| -> Result<bool> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(bad(format!("`{key}: {other}` must be true or false"))),
            }
        };
        // PEFT options that change what the adapter computes, which nibble does not compute.
        let unsupported = [
            (
                "layers_to_transform",
                "adapts only some layers; nibble adapts every layer",
            ),
            (
                "layers_pattern",
                "adapts only some layers; nibble adapts every layer",
            ),
            (
                "layer_replication",
                "builds the model from repeated layers; nibble adapts the layers as they are",
            ),
            ("lora_bias", "trains a bias on lora_B"),
            (
                "fan_in_fan_out",
                "stores weights transposed (GPT-2's Conv1D)",
            ),
        ];
        for (key, why) in unsupported {
            let set = match v.get(key) {
                None | Some(Value::Null) | Some(Value::Bool(false)) => false,
                Some(Value::Array(a)) => !a.is_empty(),
                Some(_) => true,
            };
            if set {
                return Err(bad(format!("`{key}: {}` {why}", v[key])));
            }
        }
        // Initialisations that rewrite the base's weights too (PEFT saves such an adapter against
        // the rewritten base unless converted when saved, which sets `init_lora_weights: true`).
        if let Some(init) = v.get("init_lora_weights").and_then(Value::as_str) {
            let lowered = init.to_ascii_lowercase();
            if ["pissa", "olora", "corda", "loftq"]
                .iter()
                .any(|rewrites| lowered.starts_with(rewrites))
            {
                return Err(bad(format!(
                    "`init_lora_weights: \"{init}\"` trained against a base it rewrote, which this \
                     adapter needs: convert it to a plain LoRA when saving (PEFT's \
                     `path_initial_model_for_weight_conversion`)"
                )));
            }
        }
        if switch("use_qalora")? {
            return Err(bad(
                "`use_qalora: true` pools the adapter's inputs (QA-LoRA); nibble's adapters read \
                 them whole"
                    .into(),
            ));
        }
        let names = |key: &str, what: &str| -> Result<Vec<String>> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(names)) => names
                    .iter()
                    .map(|n| n.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .ok_or_else(|| bad(format!("`{key}` entries must be {what} names"))),
                Some(other) => Err(bad(format!(
                    "`{key}: {other}` must be a list of {what} names"
                ))),
            }
        };
        let target_parameters = names("target_parameters", "parameter")?;
        if let Some(bias) = v
            .get("bias")
            .filter(|b| !b.is_null() && b.as_str() != Some("none"))
        {
            return Err(bad(format!(
                "`bias: {bias}` trains the base's biases too; nibble's adapters hold LoRA matrices only"
            )));
        }
        let to_save = names("modules_to_save", "module")?;
        if !to_save.is_empty() && !keep_modules {
            return Err(bad(format!(
                "`modules_to_save: {}` holds whole trained modules beside the LoRA matrices: nibble \
                 evaluates, generates with and merges such an adapter, but trains LoRA matrices and \
                 token rows only (trainable_token_indices)",
                v["modules_to_save"]
            )));
        }
        let token_rows = TokenIndices::read(v.get("trainable_token_indices")).map_err(bad)?;
        if !token_rows.is_empty() && !to_save.is_empty() {
            return Err(bad(
                "`modules_to_save` and `trainable_token_indices` together: nibble reads an \
                 adapter with one or the other"
                    .into(),
            ));
        }
        // PEFT ties a tied model's output projection to a saved embedding only when asked to.
        let ensure_tying = switch("ensure_weight_tying")?;
        let modules_tied = ensure_tying
            || v.get("modules_to_tie")
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty());
        let use_dora = switch("use_dora")?;
        let pattern = |key: &str| v.get(key).filter(|p| !p.is_null());
        let rank_pattern = match pattern("rank_pattern") {
            Some(p) => Patterns::from_json(p, "a positive rank")
                .map_err(|e| bad(format!("`rank_pattern` {e}")))?,
            None => Patterns::default(),
        };
        if rank_pattern
            .entries()
            .any(|(_, r)| !(1..=MAX_RANK).contains(&r))
        {
            return Err(bad(format!(
                "`rank_pattern` ranks must be from 1 to {MAX_RANK}"
            )));
        }
        let alpha_pattern = match pattern("alpha_pattern") {
            Some(p) => Patterns::from_json(p, "a number")
                .map_err(|e| bad(format!("`alpha_pattern` {e}")))?,
            None => Patterns::default(),
        };
        // Left out (or null), PEFT's LoraConfig defaults: r 8, lora_alpha 8.
        let r = match v.get("r") {
            None | Some(Value::Null) => PEFT_DEFAULT_R,
            Some(r) => r
                .as_u64()
                .ok_or_else(|| bad(format!("`r: {r}` must be a positive integer")))?
                as usize,
        };
        let alpha = match v.get("lora_alpha") {
            None | Some(Value::Null) => PEFT_DEFAULT_R as f64,
            Some(a) => a
                .as_f64()
                .ok_or_else(|| bad(format!("`lora_alpha: {a}` must be a number")))?,
        };
        if alpha == 0.0 || alpha_pattern.entries().any(|(_, a)| a == 0.0) {
            // PEFT loads it too, scaling the branch by 0.
            log::warn!(
                "{}: a `lora_alpha` of 0 scales the adapter's branch to nothing: its modules change no output",
                cfg_path.display()
            );
        }
        let dropout = match v.get("lora_dropout") {
            None | Some(Value::Null) => 0.0,
            // Checked as the f32 it is used as: 0.99999999 is 1 there, which drops everything.
            Some(d) => match d.as_f64().map(|p| p as f32) {
                Some(p) if (0.0..1.0).contains(&p) => p,
                _ => {
                    return Err(bad(format!(
                        "`lora_dropout: {d}` must be a number from 0 to 1"
                    )));
                }
            },
        };
        let use_rslora = switch("use_rslora")?;
        let mut weights = files.open_safetensors("adapter_model.safetensors")?;
        if model.moe_family() == Some(crate::config::MoeFamily::Mixtral) {
            // PEFT with transformers 4 named Mixtral's router and experts as its checkpoints do
            // (`block_sparse_moe.gate`, `block_sparse_moe.experts.{e}.w1`).
            weights.rename(|key| {
                let (module, factor) = key
                    .strip_prefix("base_model.model.")?
                    .rsplit_once(".lora_")?;
                let ours = crate::config::mixtral_name(&format!("{module}.weight"))?;
                let ours = ours.strip_suffix(".weight")?;
                Some(format!("base_model.model.{ours}.lora_{factor}"))
            });
        }
        // The adapted modules as PEFT named them when it saved the adapter (a pattern among the
        // targets was matched against these names).
        let saved_modules: Vec<String> = weights
            .tensor_names()
            .filter_map(|n| {
                n.strip_prefix("base_model.model.")?
                    .strip_suffix(".lora_A.weight")
                    .map(str::to_string)
            })
            .collect();
        let module_path = |saved: &str| match model.multimodal {
            Some(_) => crate::model::multimodal_name(saved).unwrap_or_else(|| saved.to_string()),
            None => saved.to_string(),
        };
        if model.multimodal.is_some() {
            // PEFT with transformers before 4.52 named a multimodal model's text modules in the
            // checkpoints' older spelling (`base_model.model.language_model.model.layers...`).
            weights.rename(|key| {
                let module = key.strip_prefix("base_model.model.")?;
                crate::model::multimodal_name(module).map(|m| format!("base_model.model.{m}"))
            });
        }
        let targets = match v.get("target_modules") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|m| {
                    m.as_str().map(str::to_string).ok_or_else(|| {
                        bad(format!("`target_modules` entries must be names, got {m}"))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            Some(Value::String(s)) if s == "all-linear" => vec![s.clone()],
            // PEFT adapts parameters alone where target_modules is left out.
            None | Some(Value::Null) if !target_parameters.is_empty() => Vec::new(),
            // A regular expression (PEFT full-matches it against module paths; tools use one to keep
            // a multimodal model's vision tower out): the modules it matched are the ones the weights
            // hold.
            Some(Value::String(pattern)) => {
                let matches = match whole_match(pattern) {
                    Ok(matches) => Some(matches),
                    // Python's `re` has look-around, which PEFT patterns use to keep a vision tower
                    // out (`^(?!.*vision).*q_proj`) and the regex crate lacks: the pattern chose
                    // the modules whose matrices were saved, so those are the targets.
                    Err(e) if e.to_string().contains("look-around") => {
                        log::info!(
                            "{}: `target_modules` \"{pattern}\" looks around, which nibble's \
                             patterns do not: the adapter's targets are the modules its weights hold",
                            cfg_path.display()
                        );
                        None
                    }
                    Err(e) => {
                        return Err(bad(format!(
                            "`target_modules` \"{pattern}\" is not a regular expression: {e}"
                        )));
                    }
                };
                let chosen = |m: &str| matches.as_ref().is_none_or(|matches| matches.is_match(m));
                let mut paths: Vec<String> = saved_modules
                    .iter()
                    .map(|saved| (saved, module_path(saved)))
                    .filter(|(saved, path)| chosen(saved) || chosen(path))
                    .map(|(_, path)| path)
                    .collect();
                paths.sort();
                if paths.is_empty() {
                    return Err(bad(format!(
                        "`target_modules` \"{pattern}\" matches none of the modules whose lora_A \
                         matrices the adapter's weights hold"
                    )));
                }
                paths
            }
            other => {
                return Err(bad(format!(
                    "`target_modules` must be a list of module names, a pattern or \"all-linear\", got {other:?}"
                )));
            }
        };
        if !(1..=MAX_RANK).contains(&r) {
            return Err(bad(format!("`r` must be from 1 to {MAX_RANK}")));
        }
        // PEFT's `exclude_modules` (a pattern full-matched against module paths, or names matched as
        // `target_modules` names are): the targets' modules less those, named by their paths.
        let targets = match v.get("exclude_modules") {
            None | Some(Value::Null) => targets,
            Some(excluded) => {
                let excludes: Box<dyn Fn(&str) -> bool> = match excluded {
                    Value::String(pattern) => {
                        let matches = whole_match(pattern).map_err(|e| {
                            bad(format!(
                                "`exclude_modules` \"{pattern}\" is not a regular expression: {e}"
                            ))
                        })?;
                        Box::new(move |path| matches.is_match(path))
                    }
                    Value::Array(names) => {
                        let names = names
                            .iter()
                            .map(|m| m.as_str().map(str::to_string))
                            .collect::<Option<Vec<String>>>()
                            .ok_or_else(|| bad("`exclude_modules` entries must be names".into()))?;
                        Box::new(move |path| names.iter().any(|n| targets_module(n, path)))
                    }
                    other => {
                        return Err(bad(format!(
                            "`exclude_modules` must be a list of module names or a pattern, got \
                             {other}"
                        )));
                    }
                };
                let kept: Vec<String> = resolve_among(model.linear_modules(), &targets)
                    .map_err(|e| bad(e.to_string()))?
                    .into_iter()
                    .map(|(path, _, _)| path)
                    // In either spelling of a multimodal model's modules, as for the targets.
                    .filter(|path| {
                        let saved = saved_modules.iter().find(|s| module_path(s) == *path);
                        !(excludes(path) || saved.is_some_and(|s| excludes(s)))
                    })
                    .collect();
                if kept.is_empty() {
                    return Err(bad(
                        "`exclude_modules` leaves none of the `target_modules` modules".into(),
                    ));
                }
                kept
            }
        };
        // An adapter PEFT saved per expert with transformers 4 was trained with dropout on its experts'
        // linears, which transformers 5's stacked experts take none of (PEFT refuses to load it):
        // dropout only acts in training, where a run takes its own.
        let per_expert = model.moe.is_some()
            && weights
                .tensor_names()
                .any(|n| n.contains(".experts.0.") && n.ends_with(".lora_A.weight"));
        let dropout = match per_expert && dropout > 0.0 {
            true => {
                log::info!(
                    "{}: the adapter's experts were trained per expert with `lora_dropout` \
                     {dropout}; read as transformers 5's stacked experts, which take no dropout",
                    cfg_path.display()
                );
                0.0
            }
            false => dropout,
        };
        let config = LoraConfig {
            r,
            alpha,
            dropout,
            use_rslora,
            use_dora,
            targets,
            target_parameters,
            rank_pattern,
            alpha_pattern,
        }
        .converted_for(model)
        .map_err(|e| bad(e.to_string()))?;
        refuse_router_modules(model, &config.targets).map_err(|e| bad(e.to_string()))?;
        let parameters =
            resolve_parameters(model, &config.target_parameters).map_err(|e| bad(e.to_string()))?;
        let linears = (model.linear_modules(), parameters);
        let mut adapter = Self::with_pairs(linears, config, LoraPair::zeros_stacked)
            .map_err(|e| bad(e.to_string()))?;
        let keys: Vec<(Vec<String>, f32)> = adapter
            .pairs()
            .map(|(path, _)| {
                let factors = [Factor::A, Factor::B, Factor::Magnitude];
                let keys = factors.map(|f| adapter.saved_key(path, f)).to_vec();
                (keys, adapter.config.scale_of(path))
            })
            .collect();
        let mut per_expert_keys = Vec::new();
        for ((path, pair), (keys, scale)) in adapter.pairs_mut().zip(keys) {
            if use_dora {
                pair.magnitude = vec![0.0; pair.out_features];
            }
            for f in pair.factors().collect::<Vec<_>>() {
                let key = keys[f as usize].clone();
                let shape = pair.shape(f);
                if weights.info(&key).is_none() && pair.experts > 1 {
                    // PEFT with transformers 4 saved a pair per expert's module.
                    if let Some(mut read) = per_expert_factor(&weights, (path, pair), f)? {
                        // Fused at twice the rank and alpha, rsLoRA's alpha/√r would scale the
                        // experts' updates by √2 more than the adapter trained them (PEFT's
                        // conversion does): B carries the difference.
                        let projections = pair.out_features / read.out;
                        let trained = scale_of(alpha, pair.rank / projections, use_rslora);
                        if f == Factor::B && trained != scale {
                            read.values.iter_mut().for_each(|b| *b *= trained / scale);
                        }
                        *pair.factor_mut(f) = read.values;
                        per_expert_keys.extend(read.keys);
                        continue;
                    }
                }
                check_factor(&weights, &key, &shape, "missing from the adapter")?;
                pair.set_from_peft(f, weights.read_f32(&key)?);
            }
        }
        let mut saved = SavedModules::read(&weights, &to_save, modules_tied, model)?;
        token_rows.read_into(&mut saved, (&weights, &cfg_path), model, ensure_tying)?;
        if !keep_modules {
            adapter.train_saved_rows(&mut saved, model, weights.path())?;
        }
        let mut expected: std::collections::HashSet<String> = adapter
            .trained()
            .flat_map(|(path, pair)| pair.factors().map(|f| adapter.saved_key(path, f)))
            .collect();
        expected.extend(saved.keys());
        expected.extend(per_expert_keys);
        if let Some(extra) = weights.tensor_names().find(|n| !expected.contains(*n)) {
            return Err(Error::tensor(
                weights.path(),
                extra,
                if extra.ends_with(".lora_magnitude_vector") {
                    "a DoRA magnitude, where adapter_config.json does not say use_dora"
                } else if extra.ends_with(".token_adapter.trainable_tokens_delta") {
                    "rows of trainable tokens, where adapter_config.json's \
                     `trainable_token_indices` lists none for this module"
                } else {
                    "not a LoRA matrix of this model's targets"
                },
            ));
        }
        Ok((adapter, saved))
    }
}

/// Refuses an adapter's tensor `key` that is missing (saying `missing`) or not of `shape`.
fn check_factor(
    weights: &crate::source::SafetensorsFile,
    key: &str,
    shape: &[usize],
    missing: &str,
) -> Result<()> {
    let info = weights
        .info(key)
        .ok_or_else(|| Error::tensor(weights.path(), key, missing))?;
    if info.shape != shape {
        return Err(Error::tensor(
            weights.path(),
            key,
            format!(
                "shape {:?} does not fit the model, which needs {shape:?}",
                info.shape
            ),
        ));
    }
    Ok(())
}

/// A stack of experts' factor read from the pairs PEFT saved per expert with transformers 4
/// (`mlp.experts.{e}.gate_proj.lora_A.weight`, ..., Mixtral's renamed so), fused as PEFT converts
/// them for transformers 5: gate_proj's and up_proj's pairs side by side in the stacked gate_up_proj's
/// (A's rows concatenated, B block-diagonal: rank 2r), each expert's in ParamWrapper's layout.
struct PerExpertFactor {
    values: Vec<f32>,
    keys: Vec<String>,
    /// Each projection's outputs (an expert's gate_proj's, of the two fused).
    out: usize,
}

/// `PerExpertFactor` of factor `f` of the stack at `path` (`model.layers.{l}.mlp.experts.gate_up_proj`
/// or `.down_proj`); None where the adapter holds no pair of its first expert.
fn per_expert_factor(
    weights: &crate::source::SafetensorsFile,
    (path, pair): (&str, &LoraPair),
    f: Factor,
) -> Result<Option<PerExpertFactor>> {
    let (layer, stack) = path
        .rsplit_once(".experts.")
        .expect("a stack of experts' pairs is named by its parameter");
    let projections: &[&str] = match stack {
        "gate_up_proj" => &["gate_proj", "up_proj"],
        _ => &["down_proj"],
    };
    let (experts, rank, inp) = (pair.experts, pair.rank, pair.in_features);
    let (r, out) = (
        rank / projections.len(),
        pair.out_features / projections.len(),
    );
    let factor = match f {
        Factor::A => "A",
        _ => "B",
    };
    let key = |e: usize, projection: &str| {
        format!("base_model.model.{layer}.experts.{e}.{projection}.lora_{factor}.weight")
    };
    if weights.info(&key(0, projections[0])).is_none() {
        return Ok(None);
    }
    let mut values = vec![0f32; pair.shape(f).iter().product()];
    let mut keys = Vec::new();
    for e in 0..experts {
        for (p, projection) in projections.iter().enumerate() {
            let key = key(e, projection);
            let shape = match f {
                Factor::A => vec![r, inp],
                _ => vec![out, r],
            };
            let why = "missing from the adapter, which holds the other experts' pairs";
            check_factor(weights, &key, &shape, why)?;
            let one = weights.read_f32(&key)?;
            match f {
                // Expert e's rows e·rank + p·r + k.
                Factor::A => values[(e * rank + p * r) * inp..][..r * inp].copy_from_slice(&one),
                // Row p·out + o, column (p·r + k)·experts + e.
                _ => {
                    for (o, row) in one.chunks_exact(r).enumerate() {
                        let first = (p * out + o) * rank * experts;
                        for (k, &v) in row.iter().enumerate() {
                            values[first + (p * r + k) * experts + e] = v;
                        }
                    }
                }
            }
            keys.push(key);
        }
    }
    Ok(Some(PerExpertFactor { values, keys, out }))
}

/// Whole modules a PEFT adapter saved beside its LoRA matrices (`modules_to_save`), trained in full:
/// the embedding and the output projection, each `[vocab_size, hidden_size]`, in place of the base's.
#[derive(Debug, Clone, Default)]
pub struct SavedModules {
    /// The embedding's values, with their key in adapter_model.safetensors.
    pub embed: Option<(String, Vec<f32>)>,
    /// The output projection's.
    pub head: Option<(String, Vec<f32>)>,
    /// `ensure_weight_tying`: a tied model's output projection is the saved embedding too. Without
    /// it PEFT replaces the embedding module alone, leaving the projection the base's embedding.
    pub tied: bool,
    /// Keys of the copies PEFT saves of a tied module (the output projection sharing the saved
    /// embedding under `ensure_weight_tying`), which `modules_to_save` does not list.
    tied_copies: Vec<String>,
    /// Rows of the embedding replaced (PEFT's `trainable_token_indices`); a tied model's output
    /// projection reads them too unless it has rows of its own.
    pub embed_rows: Option<TokenRows>,
    /// Rows of the output projection replaced: of a tied model, in a copy of the base's embedding.
    pub head_rows: Option<TokenRows>,
}

/// Some rows of a `[vocab_size, hidden_size]` table, in place of the base's (PEFT's
/// `trainable_tokens_delta`, which despite its name holds the rows' values, not differences).
#[derive(Debug, Clone)]
pub struct TokenRows {
    /// Its key in adapter_model.safetensors.
    pub key: String,
    pub indices: Vec<usize>,
    /// `indices.len()` rows of `hidden_size` values.
    pub values: Vec<f32>,
}

impl TokenRows {
    /// Each row's index in the table with its `width` values.
    pub fn rows(&self, width: usize) -> impl Iterator<Item = (usize, &[f32])> {
        self.indices
            .iter()
            .copied()
            .zip(self.values.chunks_exact(width))
    }

    /// Each row in place in `table` (row-major, `width` wide).
    pub fn put_into(&self, table: &mut [f32], width: usize) {
        for (row, values) in self.rows(width) {
            table[row * width..(row + 1) * width].copy_from_slice(values);
        }
    }
}

/// Refuses the tensor `key` of `weights` unless it has `shape`, with `why` of its stored shape.
fn check_shape(
    weights: &crate::source::SafetensorsFile,
    key: &str,
    shape: &[usize],
    why: impl FnOnce(&[usize]) -> String,
) -> Result<()> {
    let stored = &weights.info(key).expect("a key the file lists").shape;
    match stored[..] == *shape {
        true => Ok(()),
        false => Err(Error::tensor(weights.path(), key, why(stored))),
    }
}

/// The keys of a PEFT adapter's tensors whose module path (after `base_model.model.`) is `suffix`
/// or ends with `.suffix`: a module named by its name alone, as PEFT matches names.
fn keys_ending<'w>(weights: &'w crate::source::SafetensorsFile, suffix: &str) -> Vec<&'w String> {
    weights
        .tensor_names()
        .filter(|key| {
            key.strip_prefix("base_model.model.").is_some_and(|path| {
                path.strip_suffix(suffix)
                    .is_some_and(|before| before.is_empty() || before.ends_with('.'))
            })
        })
        .collect()
}

/// PEFT's `trainable_token_indices` by the table it names: a list names the embedding's rows; a map
/// names modules (`embed_tokens`, `lm_head`, or paths ending so).
#[derive(Default)]
struct TokenIndices {
    embed: Option<Vec<usize>>,
    head: Option<Vec<usize>>,
}

impl TokenIndices {
    fn read(value: Option<&Value>) -> std::result::Result<Self, String> {
        let list = |v: &Value| -> Option<Vec<usize>> {
            v.as_array()?
                .iter()
                .map(|i| i.as_u64().map(|i| i as usize))
                .collect()
        };
        let mut out = TokenIndices::default();
        match value {
            None | Some(Value::Null) => {}
            Some(v @ Value::Array(_)) => {
                let indices = list(v)
                    .ok_or_else(|| format!("`trainable_token_indices: {v}` must list token ids"))?;
                out.embed = Some(indices).filter(|i| !i.is_empty());
            }
            Some(Value::Object(modules)) => {
                for (name, v) in modules {
                    let indices = list(v).ok_or_else(|| {
                        format!("`trainable_token_indices` {name}: {v} must list token ids")
                    })?;
                    let slot = match name.rsplit('.').next() {
                        Some("embed_tokens") => &mut out.embed,
                        Some("lm_head") => &mut out.head,
                        _ => {
                            return Err(format!(
                                "`trainable_token_indices` names {name}: nibble replaces rows of \
                                 the embedding (embed_tokens) or the output projection (lm_head)"
                            ));
                        }
                    };
                    *slot = Some(indices).filter(|i| !i.is_empty());
                }
            }
            Some(other) => {
                return Err(format!(
                    "`trainable_token_indices: {other}` must be a list of token ids or a map of \
                     modules to lists"
                ));
            }
        }
        Ok(out)
    }

    fn is_empty(&self) -> bool {
        self.embed.is_none() && self.head.is_none()
    }

    /// Reads the rows into `saved`, with PEFT's tying: a tied model's output projection reads the
    /// embedding's new rows where it names none or the same ones (PEFT then saves the embedding's
    /// only), and rows of its own otherwise (which `ensure_weight_tying` refuses).
    fn read_into(
        self,
        saved: &mut SavedModules,
        (weights, config): (&crate::source::SafetensorsFile, &std::path::Path),
        model: &ModelConfig,
        ensure_tying: bool,
    ) -> Result<()> {
        let tied = model.tie_word_embeddings;
        let head = match (&self.embed, self.head) {
            (Some(embed), Some(head)) if tied && *embed == head => {
                // The projection reads the embedding's rows (PEFT ties it and ignores a copy of
                // its own, should the weights hold one).
                saved.tied_copies.extend(
                    keys_ending(weights, "lm_head.token_adapter.trainable_tokens_delta")
                        .into_iter()
                        .cloned(),
                );
                None
            }
            (Some(_), Some(head)) if tied && ensure_tying => {
                return Err(Error::Invalid(format!(
                    "{}: `trainable_token_indices` gives the tied embedding and output projection \
                     other rows, which `ensure_weight_tying` cannot tie (PEFT refuses it too); \
                     head rows {head:?}",
                    weights.path().display()
                )));
            }
            (_, head) => head,
        };
        let bad_ids = |module: &str, msg: String| Error::Config {
            path: config.to_path_buf(),
            msg: format!("`trainable_token_indices` of {module}: {msg}"),
        };
        let read = |module: &str, indices: Vec<usize>| -> Result<TokenRows> {
            if let Some(&past) = indices.iter().find(|&&i| i >= model.vocab_size) {
                return Err(bad_ids(
                    module,
                    format!(
                        "token id {past} is past the model's vocabulary of {} (an adapter trained \
                         with added tokens needs its base's vocabulary resized, which nibble does \
                         not do)",
                        model.vocab_size
                    ),
                ));
            }
            let mut seen = std::collections::HashSet::new();
            if let Some(twice) = indices.iter().find(|&&i| !seen.insert(i)) {
                return Err(bad_ids(module, format!("token id {twice} is listed twice")));
            }
            let suffix = format!("{module}.token_adapter.trainable_tokens_delta");
            let found = keys_ending(weights, &suffix);
            let [key] = found[..] else {
                return Err(Error::tensor(
                    weights.path(),
                    format!("base_model.model.*{suffix}"),
                    format!(
                        "`trainable_token_indices` names {module}: the adapter holds {} such \
                         tensors, not one",
                        found.len()
                    ),
                ));
            };
            let width = model.hidden_size;
            check_shape(weights, key, &[indices.len(), width], |shape| {
                format!(
                    "shape {shape:?}; {} token ids of a {width}-wide model need [{}, {width}]",
                    indices.len(),
                    indices.len()
                )
            })?;
            Ok(TokenRows {
                key: key.clone(),
                values: weights.read_f32(key)?,
                indices,
            })
        };
        if let Some(indices) = self.embed {
            saved.embed_rows = Some(read("embed_tokens", indices)?);
        }
        if let Some(indices) = head {
            saved.head_rows = Some(read("lm_head", indices)?);
        }
        Ok(())
    }
}

impl SavedModules {
    fn read(
        weights: &crate::source::SafetensorsFile,
        names: &[String],
        tied: bool,
        model: &ModelConfig,
    ) -> Result<Self> {
        let mut saved = SavedModules {
            tied,
            ..Default::default()
        };
        for name in names {
            // PEFT saves a module under its path (the `modules_to_save.default` part dropped), and
            // a name picks every module whose path ends with it.
            let found: Vec<&String> = keys_ending(weights, &format!("{name}.weight"))
                .into_iter()
                .filter(|key| !key.contains(".lora_"))
                .collect();
            let [key] = found[..] else {
                return Err(Error::tensor(
                    weights.path(),
                    format!("base_model.model.*{name}.weight"),
                    format!(
                        "`modules_to_save` names {name}: the adapter holds {} such module \
                         weights, not one",
                        found.len()
                    ),
                ));
            };
            let module = key.trim_end_matches(".weight");
            let slot = match module.rsplit('.').next() {
                Some("embed_tokens") => &mut saved.embed,
                Some("lm_head") => &mut saved.head,
                _ => {
                    return Err(Error::tensor(
                        weights.path(),
                        key,
                        format!(
                            "`modules_to_save` {name}: nibble applies a saved embedding \
                             (embed_tokens) or output projection (lm_head), not other modules"
                        ),
                    ));
                }
            };
            let shape = [model.vocab_size, model.hidden_size];
            check_shape(weights, key, &shape, |stored| {
                format!(
                    "shape {stored:?}; the model's is {shape:?} (an adapter trained with added \
                     tokens needs its base's vocabulary resized, which nibble does not do)"
                )
            })?;
            *slot = Some((key.clone(), weights.read_f32(key)?));
        }
        if tied && saved.head.is_none() {
            saved.tied_copies = keys_ending(weights, "lm_head.weight")
                .into_iter()
                .cloned()
                .collect();
        }
        Ok(saved)
    }

    fn keys(&self) -> impl Iterator<Item = String> + '_ {
        [&self.embed, &self.head]
            .into_iter()
            .flatten()
            .map(|(key, _)| key.clone())
            .chain(self.tied_copies.iter().cloned())
            .chain(
                [&self.embed_rows, &self.head_rows]
                    .into_iter()
                    .flatten()
                    .map(|rows| rows.key.clone()),
            )
    }

    pub fn is_empty(&self) -> bool {
        self.embed.is_none()
            && self.head.is_none()
            && self.embed_rows.is_none()
            && self.head_rows.is_none()
    }

    /// Whether a model whose configuration ties its projection to its embedding reads two tables
    /// with these modules in place: one of them replaced, the other not (or other rows of each).
    pub fn unties(&self, tie_word_embeddings: bool) -> bool {
        let whole = self.embed.is_some() || self.head.is_some();
        tie_word_embeddings
            && ((whole && !(self.tied && self.head.is_none())) || self.head_rows.is_some())
    }
}
