//! LoRA adapters in PEFT's layout: for each adapted linear, A [r, in] and B [out, r], and the update
//! y += scale · (dropout(x)·Aᵀ)·Bᵀ with scale = alpha/r (or alpha/√r with rsLoRA).

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::source::ModelFiles;
use serde_json::Value;

#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub use_rslora: bool,
    /// PEFT's `target_modules`: module names (or path suffixes), or `all-linear`.
    pub targets: Vec<String>,
}

impl LoraConfig {
    pub fn scale(&self) -> f32 {
        if self.use_rslora {
            (self.alpha / (self.r as f64).sqrt()) as f32
        } else {
            (self.alpha / self.r as f64) as f32
        }
    }
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            use_rslora: false,
            targets: vec!["all-linear".to_string()],
        }
    }
}

/// One adapted linear's pair of matrices, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPair {
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
    /// [rank, in_features]
    pub a: Vec<f32>,
    /// [out_features, rank]
    pub b: Vec<f32>,
}

impl LoraPair {
    fn zeros(rank: usize, in_features: usize, out_features: usize) -> Self {
        LoraPair {
            rank,
            in_features,
            out_features,
            a: vec![0.0; rank * in_features],
            b: vec![0.0; out_features * rank],
        }
    }
}

/// The adapters of a whole model: one pair per adapted linear, by module path
/// (`model.layers.3.self_attn.q_proj`), in the model's order.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraAdapter {
    pub config: LoraConfig,
    pub modules: Vec<(String, LoraPair)>,
}

/// PEFT's tensor name for one of a linear's LoRA matrices (`which` is "lora_A" or "lora_B").
pub fn peft_key(path: &str, which: &str) -> String {
    format!("base_model.model.{path}.{which}.weight")
}

/// Whether a module path is named by a PEFT `target_modules` entry: the path itself or its last
/// components (`q_proj`, `self_attn.q_proj`, `model.layers.3.self_attn.q_proj`), as PEFT matches a list.
pub fn targets_module(target: &str, path: &str) -> bool {
    path == target || path.ends_with(&format!(".{target}"))
}

/// The adapted linears of `model` for `targets` (PEFT's list semantics; `all-linear` is every linear
/// layer but the output projection): their module paths and (out, in) shapes, in the model's order.
/// A target that names no linear layer is an error that lists the names that work.
pub fn resolve_targets(
    model: &ModelConfig,
    targets: &[String],
) -> Result<Vec<(String, usize, usize)>> {
    resolve_among(model.linear_modules(), targets)
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
        linears: Vec<(String, usize, usize)>,
        config: LoraConfig,
        mut make: impl FnMut(usize, usize, usize) -> LoraPair,
    ) -> Result<Self> {
        let modules = resolve_among(linears, &config.targets)?
            .into_iter()
            .map(|(path, out, inp)| (path, make(config.r, inp, out)))
            .collect();
        Ok(LoraAdapter { config, modules })
    }

    /// PEFT's default initialisation: A ~ kaiming_uniform(a=√5), i.e. U(−1/√in, 1/√in); B = 0.
    pub fn init(model: &ModelConfig, config: LoraConfig, rng: &mut Rng) -> Result<Self> {
        Self::init_among(model.linear_modules(), config, rng)
    }

    /// `init` over a model's adaptable linears (module path, out, in).
    pub fn init_among(
        linears: Vec<(String, usize, usize)>,
        config: LoraConfig,
        rng: &mut Rng,
    ) -> Result<Self> {
        Self::with_pairs(linears, config, |r, inp, out| {
            let mut pair = LoraPair::zeros(r, inp, out);
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
                .map(|(path, p)| {
                    (
                        path.clone(),
                        LoraPair::zeros(p.rank, p.in_features, p.out_features),
                    )
                })
                .collect(),
        }
    }

    /// The pair of the linear at `path`, if it is adapted.
    pub fn pair(&self, path: &str) -> Option<&LoraPair> {
        self.modules.iter().find(|(p, _)| p == path).map(|(_, p)| p)
    }

    /// (module path, pair) of every adapted linear.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &LoraPair)> {
        self.modules.iter().map(|(path, p)| (path.as_str(), p))
    }

    pub fn pairs_mut(&mut self) -> impl Iterator<Item = (&str, &mut LoraPair)> {
        self.modules.iter_mut().map(|(path, p)| (path.as_str(), p))
    }

    pub fn parameter_count(&self) -> usize {
        self.pairs().map(|(_, p)| p.a.len() + p.b.len()).sum()
    }

    /// Loads a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) for `model`.
    pub fn load_peft(files: &ModelFiles, model: &ModelConfig) -> Result<Self> {
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
        if v.get("use_dora").and_then(Value::as_bool) == Some(true) {
            return Err(bad(
                "DoRA adapters (use_dora = true) are not supported".into()
            ));
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if v.get(key)
                .and_then(Value::as_object)
                .is_some_and(|o| !o.is_empty())
            {
                return Err(bad(format!(
                    "`{key}` (per-module ranks or alphas) is not supported"
                )));
            }
        }
        let r = v
            .get("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("`r` must be a positive integer".into()))? as usize;
        let alpha = v
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| bad("`lora_alpha` must be a number".into()))?;
        let dropout = v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32;
        let use_rslora = v
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mut weights = files.open_safetensors("adapter_model.safetensors")?;
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
            // A regular expression (PEFT full-matches it against module paths; tools use one to keep
            // a multimodal model's vision tower out): the modules it matched are the ones the weights
            // hold.
            Some(Value::String(_)) => {
                let mut paths: Vec<String> = weights
                    .tensor_names()
                    .filter_map(|n| {
                        n.strip_prefix("base_model.model.")?
                            .strip_suffix(".lora_A.weight")
                            .map(str::to_string)
                    })
                    .collect();
                paths.sort();
                if paths.is_empty() {
                    return Err(bad(
                        "`target_modules` is a pattern and the adapter's weights hold no lora_A matrices".into(),
                    ));
                }
                paths
            }
            other => {
                return Err(bad(format!(
                    "`target_modules` must be a list of module names, a pattern or \"all-linear\", got {other:?}"
                )));
            }
        };
        if r == 0 {
            return Err(bad("`r` must be positive".into()));
        }
        let config = LoraConfig {
            r,
            alpha,
            dropout,
            use_rslora,
            targets,
        };

        let mut adapter = Self::with_pairs(model.linear_modules(), config, LoraPair::zeros)
            .map_err(|e| bad(e.to_string()))?;
        for (path, pair) in adapter.pairs_mut() {
            for (which, shape) in [
                ("lora_A", [pair.rank, pair.in_features]),
                ("lora_B", [pair.out_features, pair.rank]),
            ] {
                let key = peft_key(path, which);
                let info = weights.info(&key).ok_or_else(|| {
                    Error::tensor(weights.path(), &key, "missing from the adapter")
                })?;
                if info.shape != shape {
                    return Err(Error::tensor(
                        weights.path(),
                        &key,
                        format!(
                            "shape {:?} does not fit the model, which needs {:?}",
                            info.shape, shape
                        ),
                    ));
                }
                let values = weights.read_f32(&key)?;
                if which == "lora_A" {
                    pair.a = values;
                } else {
                    pair.b = values;
                }
            }
        }
        let expected: std::collections::HashSet<String> = adapter
            .pairs()
            .flat_map(|(path, _)| [peft_key(path, "lora_A"), peft_key(path, "lora_B")])
            .collect();
        if let Some(extra) = weights.tensor_names().find(|n| !expected.contains(*n)) {
            return Err(Error::tensor(
                weights.path(),
                extra,
                "not a LoRA matrix of this model's targets",
            ));
        }
        Ok(adapter)
    }
}
