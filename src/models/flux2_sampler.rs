//! Sampling images from a FLUX.2 [klein] transformer as diffusers' Flux2KleinPipeline does: the
//! scheduler's sigmas (FlowMatchEulerDiscreteScheduler, shifted by the pipeline's empirical mu for
//! the image's size and the step count), one Euler step per sigma on the predicted velocity, with
//! classifier-free guidance against the empty prompt where the guidance scale exceeds 1.

#[cfg(not(target_arch = "wasm32"))]
use crate::error::{Error, Result};
use serde::Deserialize;

/// The scheduler's settings (scheduler/scheduler_config.json, its fields defaulting as diffusers'
/// class defaults them; `klein()` where a pipeline has none). Settings nibble does not implement are
/// refused by name.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct FlowScheduler {
    pub num_train_timesteps: usize,
    pub shift: f64,
    pub use_dynamic_shifting: bool,
    pub time_shift_type: String,
    pub shift_terminal: Option<f64>,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub invert_sigmas: bool,
    pub stochastic_sampling: bool,
    /// Other schedulers' switch, which makes the pipeline drop its sigmas.
    pub use_flow_sigmas: bool,
}

impl Default for FlowScheduler {
    /// FlowMatchEulerDiscreteScheduler's own defaults.
    fn default() -> Self {
        FlowScheduler {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            time_shift_type: "exponential".into(),
            shift_terminal: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            invert_sigmas: false,
            stochastic_sampling: false,
            use_flow_sigmas: false,
        }
    }
}

/// Flux2KleinPipeline's mu for `image_tokens` tokens and `steps` steps: a line in the step count
/// through fits at 10 and 200 steps, or a line in the tokens alone past 4300 tokens.
pub fn empirical_mu(image_tokens: usize, steps: usize) -> f64 {
    let (a1, b1) = (8.73809524e-05, 1.89833333);
    let (a2, b2) = (0.00016927, 0.45666666);
    let tokens = image_tokens as f64;
    if image_tokens > 4300 {
        return a2 * tokens + b2;
    }
    let m200 = a2 * tokens + b2;
    let m10 = a1 * tokens + b1;
    let a = (m200 - m10) / 190.0;
    a * steps as f64 + m200 - 200.0 * a
}

impl FlowScheduler {
    /// What FLUX.2 [klein] pipelines ship: dynamic shifting, shift 3.
    pub fn klein() -> Self {
        FlowScheduler {
            shift: 3.0,
            use_dynamic_shifting: true,
            ..Self::default()
        }
    }

    /// The pipeline's scheduler: `scheduler/scheduler_config.json` in `pipeline` where it exists,
    /// else klein's.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn of_pipeline(pipeline: Option<&std::path::Path>) -> Result<Self> {
        let Some(path) = pipeline
            .map(|p| p.join("scheduler/scheduler_config.json"))
            .filter(|p| p.is_file())
        else {
            return Ok(Self::klein());
        };
        let text = crate::fsutil::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let scheduler: FlowScheduler = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.clone(),
            msg: format!("not a FlowMatchEulerDiscreteScheduler config: {e}"),
        })?;
        scheduler
            .check()
            .map_err(|msg| Error::Config { path, msg })?;
        Ok(scheduler)
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn check(&self) -> std::result::Result<(), String> {
        let unsupported = [
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("invert_sigmas", self.invert_sigmas),
            ("stochastic_sampling", self.stochastic_sampling),
            ("shift_terminal", self.shift_terminal.is_some()),
            ("use_flow_sigmas", self.use_flow_sigmas),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, on)| *on) {
            return Err(format!(
                "{name} is set: nibble samples with klein's schedule (dynamic shifting, Euler steps)"
            ));
        }
        if !["exponential", "linear"].contains(&self.time_shift_type.as_str()) {
            return Err(format!(
                "time_shift_type \"{}\": exponential or linear",
                self.time_shift_type
            ));
        }
        if self.num_train_timesteps == 0 || !(self.shift.is_finite() && self.shift > 0.0) {
            return Err("num_train_timesteps and shift must be positive".into());
        }
        Ok(())
    }

    /// The `steps` + 1 sigmas from 1 down to 0 for an image of `image_tokens` tokens, in f32 as
    /// NumPy and torch compute them: the pipeline's linspace(1, 1/steps), shifted.
    pub fn sigmas(&self, steps: usize, image_tokens: usize) -> Vec<f32> {
        let mu = empirical_mu(image_tokens, steps);
        // np.linspace(1.0, 1 / steps, steps): i · step + start in f64, the last value exactly.
        let last = 1.0 / steps as f64;
        let step = (last - 1.0) / (steps.max(2) - 1) as f64;
        let mut sigmas: Vec<f32> = (0..steps)
            .map(|i| {
                let t = if i + 1 == steps && i > 0 {
                    last
                } else {
                    i as f64 * step + 1.0
                };
                let t = t as f32;
                if !self.use_dynamic_shifting {
                    let shift = self.shift as f32;
                    return shift * t / (1.0 + (shift - 1.0) * t);
                }
                let m = if self.time_shift_type == "linear" {
                    mu as f32
                } else {
                    mu.exp() as f32
                };
                m / (m + (1.0 / t - 1.0))
            })
            .collect();
        sigmas.push(0.0);
        sigmas
    }
}

/// The starting noise of a sample: `len` standard normal values drawn from `seed` (nibble's own
/// generator; torch's differs, so a seed gives other images than diffusers').
pub fn seeded_noise(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = crate::rng::Rng::new(seed);
    (0..len).map(|_| rng.normal() as f32).collect()
}

/// What a sample is made of besides the model: the prompt's features and, for guidance, the empty
/// prompt's (both [text tokens, text width]), the token grid, the starting noise, the scheduler's
/// sigmas with its training timesteps, and the guidance scale.
pub struct SampleSpec<'a> {
    pub text: &'a [f32],
    pub negative: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub noise: Vec<f32>,
    pub sigmas: &'a [f32],
    pub train_timesteps: usize,
    pub guidance: f32,
    /// Reference images (the pipeline's `image=`): clean latent tokens the transformer attends to
    /// beside the image it draws, in both guidance passes, at every step.
    pub references: &'a [Reference],
}

pub use crate::models::flux2::Reference;

/// The denoised latent tokens [rows · cols, in_channels]: from the noise, each step's velocity (the
/// guided mix v_empty + g · (v − v_empty) where g > 1) times the sigma's fall, added in f32 as the
/// scheduler's Euler step does. References join the image tokens after the noised ones (the
/// pipeline drops their velocities; the graph does not compute them), as Flux2KleinPipeline joins them. `progress` hears of each finished step.
#[cfg(not(target_arch = "wasm32"))]
pub fn denoise(
    model: &crate::models::flux2::Flux2Model,
    (executor, adapter): (crate::exec::Forward, Option<crate::exec::AdapterCopies>),
    spec: SampleSpec,
    progress: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<Vec<f32>> {
    use crate::models::decoder::LoraSpec;
    use crate::models::flux2::{self, Flux2Inputs, Flux2Step};
    let c = &model.config;
    let n = spec.rows * spec.cols;
    let text_tokens = spec.text.len() / c.text_dim;
    if spec.noise.len() != n * c.in_channels
        || spec.text.len() != text_tokens * c.text_dim
        || spec.negative.len() != spec.text.len()
        || text_tokens == 0
        || spec
            .references
            .iter()
            .any(|r| r.tokens.len() != r.rows * r.cols * c.in_channels)
    {
        return Err(Error::Invalid(format!(
            "sampling a {} x {} grid takes {} noise values, equal prompt and empty-prompt features \
             of width {}, and reference tokens {} wide",
            spec.rows,
            spec.cols,
            n * c.in_channels,
            c.text_dim,
            c.in_channels
        )));
    }
    let lora = adapter.map(|(a, _)| LoraSpec {
        dropout: 0.0,
        ..LoraSpec::of(a)
    });
    let (image_ids, text_ids) = flux2::position_ids(spec.rows, spec.cols, text_tokens);
    let image_ids = flux2::with_reference_ids(&image_ids, spec.references);
    let step = Flux2Step {
        image_tokens: n,
        reference_tokens: image_ids.len() - n,
        text_tokens,
        backward: false,
        checkpoint: false,
    };
    let graph = flux2::build(c, lora.as_ref(), step);
    // The step's loss is computed against this and not read.
    let unused_target = vec![0f32; n * c.out_channels];
    let timesteps = spec.train_timesteps as f32;
    let mut latents = spec.noise;
    for (i, pair) in spec.sigmas.windows(2).enumerate() {
        // The pipeline hands the transformer timestep / 1000 of the scheduler's timestep, sigma
        // times its training timesteps, in f32.
        let sigma = pair[0] * timesteps / 1000.0;
        let noised = flux2::with_reference_tokens(&latents, spec.references);
        let velocity = |text: &[f32]| -> Result<Vec<f32>> {
            let inputs = flux2::inputs(
                c,
                &Flux2Inputs {
                    noised: &noised,
                    text,
                    sigma,
                    image_ids: &image_ids,
                    text_ids: &text_ids,
                    target: &unused_target,
                    grad_scale: 1.0,
                },
            );
            let mut out = executor.run_adapted(&graph, (model, adapter), &inputs, &["velocity"])?;
            Ok(out.pop().expect("one output"))
        };
        let mut v = velocity(spec.text)?;
        if spec.guidance > 1.0 {
            let empty = velocity(spec.negative)?;
            for (v, e) in v.iter_mut().zip(&empty) {
                *v = e + spec.guidance * (*v - e);
            }
        }
        let dt = pair[1] - pair[0];
        for (x, v) in latents.iter_mut().zip(&v) {
            *x += dt * v;
        }
        progress(i + 1)?;
    }
    Ok(latents)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both branches of the pipeline's fit, at values compute_empirical_mu gives (diffusers 0.42.1).
    #[test]
    fn empirical_mu_follows_the_pipeline_s_fits() {
        let mu = empirical_mu(1024, 50);
        assert!((mu - 1.701_956_207_308_631_6).abs() < 1e-12, "{mu}");
        assert!((empirical_mu(9216, 28) - 2.016_658_98).abs() < 1e-12);
        // Past 4300 tokens only the token count matters.
        assert_eq!(empirical_mu(9216, 28), empirical_mu(9216, 4));
    }

    /// A scheduler config's missing fields take diffusers' class defaults (shift 1, no dynamic
    /// shifting: the plain linspace), klein's own is what `klein()` says, and settings nibble does
    /// not implement are refused by name.
    #[test]
    fn scheduler_configs_read_as_diffusers_reads_them() {
        let bare: FlowScheduler = serde_json::from_str("{}").unwrap();
        assert_eq!(bare.sigmas(4, 4096), [1.0, 0.75, 0.5, 0.25, 0.0]);
        let shipped = r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
            "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
            "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": true}"#;
        let shipped: FlowScheduler = serde_json::from_str(shipped).unwrap();
        assert_eq!(shipped, FlowScheduler::klein());
        assert!(shipped.check().is_ok());
        for (field, value) in [
            ("use_karras_sigmas", "true"),
            ("stochastic_sampling", "true"),
            ("shift_terminal", "0.02"),
            ("use_flow_sigmas", "true"),
            ("time_shift_type", "\"cosine\""),
        ] {
            let config: FlowScheduler =
                serde_json::from_str(&format!("{{\"{field}\": {value}}}")).unwrap();
            let e = config.check().unwrap_err();
            assert!(e.contains(field), "{e}");
        }
    }
}
