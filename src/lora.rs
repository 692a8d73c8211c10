//! LoRA adapters in PEFT's layout: for each adapted linear, A [r, in] and B [out, r], and the update
//! y += scale · (dropout(x)·Aᵀ)·Bᵀ with scale = alpha/r (or alpha/√r with rsLoRA).

use crate::config::{LinearKind, ModelConfig};
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
    pub targets: Vec<LinearKind>,
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
            targets: LinearKind::ALL.to_vec(),
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

/// The adapters of a whole model: `layers[l][kind as usize]`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraAdapter {
    pub config: LoraConfig,
    pub layers: Vec<Vec<Option<LoraPair>>>,
}

/// PEFT's tensor name for one of a linear's LoRA matrices (`which` is "lora_A" or "lora_B").
pub fn peft_key(layer: usize, kind: LinearKind, which: &str) -> String {
    format!("base_model.model.{}.{which}.weight", kind.path(layer))
}

impl LoraAdapter {
    fn with_pairs(
        model: &ModelConfig,
        config: LoraConfig,
        mut make: impl FnMut(usize, usize, usize) -> LoraPair,
    ) -> Self {
        let layers = (0..model.num_layers)
            .map(|_| {
                LinearKind::ALL
                    .into_iter()
                    .map(|kind| {
                        config.targets.contains(&kind).then(|| {
                            let (out, inp) = model.linear_shape(kind);
                            make(config.r, inp, out)
                        })
                    })
                    .collect()
            })
            .collect();
        LoraAdapter { config, layers }
    }

    /// PEFT's default initialisation: A ~ kaiming_uniform(a=√5), i.e. U(−1/√in, 1/√in); B = 0.
    pub fn init(model: &ModelConfig, config: LoraConfig, rng: &mut Rng) -> Self {
        Self::with_pairs(model, config, |r, inp, out| {
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
            layers: self
                .layers
                .iter()
                .map(|l| {
                    l.iter()
                        .map(|p| {
                            p.as_ref()
                                .map(|p| LoraPair::zeros(p.rank, p.in_features, p.out_features))
                        })
                        .collect()
                })
                .collect(),
        }
    }

    pub fn pair(&self, layer: usize, kind: LinearKind) -> Option<&LoraPair> {
        self.layers[layer][kind as usize].as_ref()
    }

    pub fn pairs(&self) -> impl Iterator<Item = (usize, LinearKind, &LoraPair)> {
        self.layers.iter().enumerate().flat_map(|(l, kinds)| {
            kinds
                .iter()
                .zip(LinearKind::ALL)
                .filter_map(move |(p, k)| p.as_ref().map(|p| (l, k, p)))
        })
    }

    pub fn pairs_mut(&mut self) -> impl Iterator<Item = (usize, LinearKind, &mut LoraPair)> {
        self.layers.iter_mut().enumerate().flat_map(|(l, kinds)| {
            kinds
                .iter_mut()
                .zip(LinearKind::ALL)
                .filter_map(move |(p, k)| p.as_mut().map(|p| (l, k, p)))
        })
    }

    pub fn parameter_count(&self) -> usize {
        self.pairs().map(|(_, _, p)| p.a.len() + p.b.len()).sum()
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
        if let Some(t) = v.get("peft_type").and_then(Value::as_str) {
            if t != "LORA" {
                return Err(bad(format!("peft_type `{t}` is not LORA")));
            }
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
        let targets = match v.get("target_modules") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|m| {
                    let name = m.as_str().unwrap_or_default();
                    LinearKind::from_module_name(name).ok_or_else(|| {
                        bad(format!(
                            "target module `{name}` is not one of the decoder's linear layers"
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            Some(Value::String(s)) if s == "all-linear" => LinearKind::ALL.to_vec(),
            other => {
                return Err(bad(format!(
                    "`target_modules` must be a list of module names, got {other:?}"
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

        let weights = files.open_safetensors("adapter_model.safetensors")?;
        let mut adapter =
            Self::with_pairs(model, config, |r, inp, out| LoraPair::zeros(r, inp, out));
        for (l, kind, pair) in adapter.pairs_mut() {
            for (which, shape) in [
                ("lora_A", [pair.rank, pair.in_features]),
                ("lora_B", [pair.out_features, pair.rank]),
            ] {
                let key = peft_key(l, kind, which);
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
            .flat_map(|(l, k, _)| [peft_key(l, k, "lora_A"), peft_key(l, k, "lora_B")])
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
