//! The learning-rate schedules of transformers' `lr_scheduler_type`, with their `lr_scheduler_kwargs`,
//! as the multiplier of the peak rate for each optimizer step (`get_scheduler`'s `LambdaLR` lambdas).

use crate::error::{Error, Result};

/// The schedule, by transformers' name.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// The peak rate throughout; warmup does not apply (transformers' `constant`).
    Constant,
    /// Warmup, then the peak rate.
    #[value(name = "constant_with_warmup", alias = "constant-with-warmup")]
    ConstantWithWarmup,
    Linear,
    /// Half a cosine wave down to 0 (`num_cycles` waves: 0.5).
    Cosine,
    /// `num_cycles` (1) cosine descents, each restarting at the peak.
    #[value(name = "cosine_with_restarts", alias = "cosine-with-restarts")]
    CosineWithRestarts,
    /// From the peak to `lr_end` (1e-7) as a polynomial of degree `power` (1).
    Polynomial,
    /// The peak times √(timescale / (step + timescale − warmup)); `timescale` defaults to the warmup
    /// steps, or 10,000 without warmup.
    #[value(name = "inverse_sqrt", alias = "inverse-sqrt")]
    InverseSqrt,
    /// A cosine down to `min_lr` or `min_lr_rate` times the peak (one of them is needed).
    #[value(name = "cosine_with_min_lr", alias = "cosine-with-min-lr")]
    CosineWithMinLr,
    /// The same, its warmup and descent a step ahead (`warmup_lr_rate`: where warmup starts).
    #[value(
        name = "cosine_warmup_with_min_lr",
        alias = "cosine-warmup-with-min-lr"
    )]
    CosineWarmupWithMinLr,
    /// Warmup, a stable stretch, then `num_decay_steps` (needed) of decay (`decay_type`: cosine,
    /// linear or 1-sqrt) down to `min_lr_ratio` (0).
    #[value(name = "warmup_stable_decay", alias = "warmup-stable-decay")]
    WarmupStableDecay,
}

serde_as_value_enum!(Schedule);

/// transformers' `lr_scheduler_kwargs`: the schedule's own parameters. Each schedule takes only its
/// own (`Schedule::check`), as transformers' functions take them.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleKwargs {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_cycles: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr_end: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timescale: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_lr_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_lr_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_decay_steps: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_stable_steps: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_type: Option<Shape>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decay_type: Option<Shape>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_lr_ratio: Option<f64>,
}

/// How warmup-stable-decay's warmup rises and its decay falls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Shape {
    #[serde(rename = "linear")]
    Linear,
    #[serde(rename = "cosine")]
    Cosine,
    #[serde(rename = "1-sqrt")]
    OneMinusSqrt,
}

impl ScheduleKwargs {
    /// Parses `--lr-scheduler-kwargs`, a JSON object.
    pub fn parse(text: &str) -> std::result::Result<ScheduleKwargs, String> {
        serde_json::from_str(text)
            .map_err(|e| format!("a JSON object of the schedule's parameters: {e}"))
    }

    /// The parameters given, by name.
    fn given(&self) -> Vec<&'static str> {
        let named = [
            ("num_cycles", self.num_cycles.is_some()),
            ("lr_end", self.lr_end.is_some()),
            ("power", self.power.is_some()),
            ("timescale", self.timescale.is_some()),
            ("min_lr", self.min_lr.is_some()),
            ("min_lr_rate", self.min_lr_rate.is_some()),
            ("warmup_lr_rate", self.warmup_lr_rate.is_some()),
            ("num_decay_steps", self.num_decay_steps.is_some()),
            ("num_stable_steps", self.num_stable_steps.is_some()),
            ("warmup_type", self.warmup_type.is_some()),
            ("decay_type", self.decay_type.is_some()),
            ("min_lr_ratio", self.min_lr_ratio.is_some()),
        ];
        named
            .into_iter()
            .filter(|(_, set)| *set)
            .map(|(n, _)| n)
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.given().is_empty()
    }
}

impl Schedule {
    /// The parameters this schedule takes.
    fn takes(self) -> &'static [&'static str] {
        match self {
            Schedule::Constant | Schedule::ConstantWithWarmup | Schedule::Linear => &[],
            Schedule::Cosine | Schedule::CosineWithRestarts => &["num_cycles"],
            Schedule::Polynomial => &["lr_end", "power"],
            Schedule::InverseSqrt => &["timescale"],
            Schedule::CosineWithMinLr => &["num_cycles", "min_lr", "min_lr_rate"],
            Schedule::CosineWarmupWithMinLr => {
                &["num_cycles", "min_lr", "min_lr_rate", "warmup_lr_rate"]
            }
            Schedule::WarmupStableDecay => &[
                "num_decay_steps",
                "num_stable_steps",
                "warmup_type",
                "decay_type",
                "min_lr_ratio",
                "num_cycles",
            ],
        }
    }

    /// The schedule's name as options spell it.
    pub fn name(self) -> String {
        crate::value_name(self)
    }

    /// Refuses parameters the schedule does not take, and a schedule without those it needs, as
    /// transformers refuses them (before any step runs, not at the first step).
    pub fn check(self, kwargs: &ScheduleKwargs, lr: f64) -> Result<()> {
        let name = self.name();
        if let Some(extra) = kwargs
            .given()
            .into_iter()
            .find(|k| !self.takes().contains(k))
        {
            let takes = match self.takes() {
                [] => "none".to_string(),
                names => names.join(", "),
            };
            return Err(Error::Invalid(format!(
                "--lr-scheduler-kwargs: {name} takes no `{extra}` (it takes: {takes})"
            )));
        }
        let finite = |v: Option<f64>| v.is_none_or(f64::is_finite);
        let all_finite = [
            kwargs.num_cycles,
            kwargs.lr_end,
            kwargs.power,
            kwargs.min_lr,
            kwargs.min_lr_rate,
            kwargs.warmup_lr_rate,
            kwargs.min_lr_ratio,
        ]
        .into_iter()
        .all(finite);
        if !all_finite {
            return Err(Error::Invalid(
                "--lr-scheduler-kwargs: every number must be finite".into(),
            ));
        }
        match self {
            Schedule::CosineWithMinLr | Schedule::CosineWarmupWithMinLr => {
                match (kwargs.min_lr, kwargs.min_lr_rate) {
                    (Some(_), Some(_)) => {
                        return Err(Error::Invalid(format!(
                            "--lr-scheduler-kwargs: {name} takes one of min_lr and min_lr_rate, not both"
                        )));
                    }
                    (None, None) => {
                        return Err(Error::Invalid(format!(
                            "{name} needs min_lr or min_lr_rate in --lr-scheduler-kwargs, such as '{{\"min_lr_rate\": 0.1}}'"
                        )));
                    }
                    (Some(_), None) if lr == 0.0 => {
                        return Err(Error::Invalid(format!(
                            "{name}: min_lr is a fraction of --lr, which is 0: give min_lr_rate"
                        )));
                    }
                    _ => {}
                }
            }
            Schedule::Polynomial if lr <= kwargs.lr_end.unwrap_or(LR_END) => {
                return Err(Error::Invalid(format!(
                    "polynomial: lr_end ({}) must be smaller than --lr ({lr})",
                    kwargs.lr_end.unwrap_or(LR_END)
                )));
            }
            Schedule::InverseSqrt if kwargs.timescale == Some(0) => {
                return Err(Error::Invalid(
                    "--lr-scheduler-kwargs: inverse_sqrt's timescale must be at least 1".into(),
                ));
            }
            Schedule::WarmupStableDecay if kwargs.num_decay_steps.is_none() => {
                return Err(Error::Invalid(
                    "warmup_stable_decay needs num_decay_steps in --lr-scheduler-kwargs, such as '{\"num_decay_steps\": 100}'"
                        .into(),
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// transformers' multiplier of the peak rate `lr` for the optimizer step that follows `step`
    /// completed steps of `total`, `warmup` of them warmup. `kwargs` must have passed `check`.
    pub fn factor(
        self,
        kwargs: &ScheduleKwargs,
        lr: f64,
        step: usize,
        warmup: usize,
        total: usize,
    ) -> f64 {
        let (s, w, n) = (step as f64, warmup as f64, total as f64);
        let rising = || s / w.max(1.0);
        let progress = || (s - w) / (n - w).max(1.0);
        let half_cycles = |default: f64| kwargs.num_cycles.unwrap_or(default) * 2.0;
        let min_lr_rate = || match (kwargs.min_lr, kwargs.min_lr_rate) {
            (Some(min_lr), _) => min_lr / lr,
            (None, rate) => rate.unwrap_or(0.0),
        };
        let cosine = |progress: f64, rate: f64| {
            let f = 0.5 * (1.0 + (std::f64::consts::PI * half_cycles(0.5) * progress).cos());
            (f * (1.0 - rate) + rate).max(0.0)
        };
        match self {
            Schedule::Constant => 1.0,
            _ if step < warmup && self != Schedule::CosineWarmupWithMinLr => match self {
                Schedule::WarmupStableDecay => {
                    let rate = kwargs.min_lr_ratio.unwrap_or(0.0);
                    let f = shape_rise(kwargs.warmup_type.unwrap_or(Shape::Linear), rising());
                    (f * (1.0 - rate) + rate).max(0.0)
                }
                _ => rising(),
            },
            Schedule::ConstantWithWarmup => 1.0,
            Schedule::Linear => ((n - s) / (n - w).max(1.0)).max(0.0),
            Schedule::Cosine => cosine(progress(), 0.0),
            Schedule::CosineWithRestarts => {
                let p = progress();
                if p >= 1.0 {
                    return 0.0;
                }
                let cycles = kwargs.num_cycles.unwrap_or(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * ((cycles * p) % 1.0)).cos())).max(0.0)
            }
            Schedule::Polynomial => {
                let lr_end = kwargs.lr_end.unwrap_or(LR_END);
                if step > total {
                    return lr_end / lr;
                }
                let remaining = 1.0 - (s - w) / (n - w);
                ((lr - lr_end) * remaining.powf(kwargs.power.unwrap_or(1.0)) + lr_end) / lr
            }
            Schedule::InverseSqrt => {
                let timescale = match kwargs.timescale {
                    Some(t) => t as f64,
                    None if warmup > 0 => w,
                    None => 10_000.0,
                };
                1.0 / ((s + timescale - w) / timescale).sqrt()
            }
            Schedule::CosineWithMinLr => cosine(progress(), min_lr_rate()),
            Schedule::CosineWarmupWithMinLr => {
                if s < w {
                    return match kwargs.warmup_lr_rate {
                        None => (s + 1.0) / w.max(1.0),
                        Some(r) => r + (1.0 - r) * s / (w - 1.0).max(1.0),
                    };
                }
                cosine((s - w + 1.0) / (n - w).max(1.0), min_lr_rate())
            }
            Schedule::WarmupStableDecay => {
                let rate = kwargs.min_lr_ratio.unwrap_or(0.0);
                let decay = kwargs.num_decay_steps.unwrap_or(0) as f64;
                let stable = match kwargs.num_stable_steps {
                    Some(k) => k as f64,
                    None => n - w - decay,
                };
                if s < w + stable {
                    return 1.0;
                }
                if s < w + stable + decay {
                    let p = (s - w - stable) / decay.max(1.0);
                    let f = match kwargs.decay_type.unwrap_or(Shape::Cosine) {
                        Shape::Linear => 1.0 - p,
                        Shape::Cosine => {
                            0.5 * (1.0 + (std::f64::consts::PI * half_cycles(0.5) * p).cos())
                        }
                        Shape::OneMinusSqrt => 1.0 - p.sqrt(),
                    };
                    return (f * (1.0 - rate) + rate).max(0.0);
                }
                rate
            }
        }
    }
}

/// transformers' default end of the polynomial schedule.
const LR_END: f64 = 1e-7;

/// Warmup-stable-decay's rise over warmup `progress` (0 to 1).
fn shape_rise(shape: Shape, progress: f64) -> f64 {
    match shape {
        Shape::Linear => progress,
        Shape::Cosine => 0.5 * (1.0 - (std::f64::consts::PI * progress).cos()),
        Shape::OneMinusSqrt => 1.0 - (1.0 - progress).sqrt(),
    }
}
