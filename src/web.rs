//! The browser API (wasm-bindgen): load a model (the built-in tiny one, or a Hugging Face folder's files
//! as bytes), set a chat dataset and options, step the trainer, generate text, and export the adapter as
//! a PEFT folder's two files. Training runs on WebGPU when the browser has it (the same WGSL kernels as
//! native), otherwise on the CPU executor compiled to wasm. Every call that touches the GPU returns a
//! Promise: read-backs complete from the page's event loop, so nothing blocks the main thread.

// Each call holds the session's borrow across its awaited GPU read-backs on purpose: a second call
// meanwhile gets "the session is busy" instead of interleaving with a step.
#![allow(clippy::await_holding_refcell_ref)]

use crate::exec::Device;
use crate::gpu::Gpu;
use crate::model::{Model, ModelSource};
use crate::source::ModelFiles;
use crate::synth;
use crate::tokenizer::ChatTokenizer;
use crate::train::StepRecord;
use crate::train::run::{Observer, Run, RunData};
use crate::train::settings::TrainSettings;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use wasm_bindgen::prelude::*;

fn js_error(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

struct Inner {
    /// Shared with the run, which co-owns it: a session outlives every call into it.
    model: Arc<Model>,
    gpu: Option<Arc<Gpu>>,
    tok: ChatTokenizer,
    label: String,
    run: Option<Run<'static>>,
}

/// A loaded model with its tokenizer, an executor, and (after `setData`) a training run.
#[wasm_bindgen]
pub struct Session {
    inner: Rc<RefCell<Inner>>,
}

/// The validation losses a step produced, by step: its own where one fell due, and step 0's before
/// the first step (`eval_on_start`).
#[derive(Default)]
struct Evaluated(Vec<(usize, f64)>);

impl Observer for Evaluated {
    fn evaluated(&mut self, step: usize, loss: f64) {
        self.0.push((step, loss));
    }
}

/// The example chat set the page starts with, as JSONL.
#[wasm_bindgen(js_name = demoData)]
pub fn demo_data() -> String {
    crate::data::demo_jsonl()
}

/// The options the page starts from, as JSON with `nibble train`'s keys: the demo preset's (what
/// `nibble demo` trains its built-in model with), so the page and the command line agree.
#[wasm_bindgen(js_name = demoOptions)]
pub fn demo_options() -> Result<String, JsError> {
    let preset = TrainSettings::preset("demo").map_err(js_error)?;
    serde_json::to_string(&preset).map_err(js_error)
}

/// Opens a session. `files` is null for the built-in model, or an array of [name, Uint8Array] pairs of
/// a Hugging Face model folder (config.json, safetensors, tokenizer files). `device` is "auto" (WebGPU
/// when the browser has it, else CPU), "gpu" or "cpu".
#[wasm_bindgen(js_name = openSession)]
pub async fn open_session(files: JsValue, device: String) -> Result<Session, JsError> {
    let files = if files.is_null() || files.is_undefined() {
        synth::browser_model()
    } else {
        let mut map = BTreeMap::new();
        let mut label = "uploaded".to_string();
        for pair in js_sys::Array::from(&files).iter() {
            let pair = js_sys::Array::from(&pair);
            let name = pair
                .get(0)
                .as_string()
                .ok_or_else(|| JsError::new("files: each entry is [name, Uint8Array]"))?;
            // A view of the caller's array (`Uint8Array::new` would copy it first).
            let array = pair
                .get(1)
                .dyn_into::<js_sys::Uint8Array>()
                .map_err(|_| JsError::new(&format!("files: {name} is not a Uint8Array")))?;
            let bytes = copy_into_wasm(&array);
            // A folder picked in the browser comes with paths: the folder names the model, and files are
            // looked up by name.
            if let Some((folder, _)) = name.split_once('/') {
                label = folder.to_string();
            }
            let base = name.rsplit('/').next().unwrap_or(&name).to_string();
            map.insert(base, bytes);
        }
        ModelFiles::Memory { label, files: map }
    };
    let source = ModelSource::open_folder(files).map_err(js_error)?;
    let tok = source.chat_tokenizer().map_err(js_error)?;
    let model = Arc::new(source.load(None).map_err(js_error)?);
    let device = <Device as clap::ValueEnum>::from_str(&device, true)
        .map_err(|_| JsError::new(&format!("unknown device `{device}` (auto, gpu or cpu)")))?;
    let gpu = device.open_async().await.map_err(js_error)?.map(Arc::new);
    Ok(Session {
        inner: Rc::new(RefCell::new(Inner {
            model,
            gpu,
            tok,
            label: source.label().to_string(),
            run: None,
        })),
    })
}

/// A run on `inner`'s model and executor over `jsonl` with `options` (JSON, `nibble train`'s keys), and
/// how many examples it read.
fn start_run(
    inner: &Inner,
    gpu: Option<&Arc<Gpu>>,
    jsonl: &str,
    options: &str,
) -> Result<(Run<'static>, usize), JsError> {
    let given = TrainSettings::parse_json(options).map_err(js_error)?;
    // A preset's storage choice is the CLI's business; the page's own options must apply.
    let outside = given.outside_the_page();
    if !outside.is_empty() {
        return Err(JsError::new(&format!(
            "options: {} do not apply in a page (they name files, or were fixed when the session \
             opened)",
            outside.join(", ")
        )));
    }
    let settings = given.with_preset().map_err(js_error)?;
    let config = settings.train_config().map_err(js_error)?;
    let run_options = settings.run_options().map_err(js_error)?;
    let (examples, places) =
        crate::data::parse_jsonl_placed(jsonl, "dataset", &config.text_field).map_err(js_error)?;
    let train_config = run_options.tokenizing(&config);
    let packing = run_options.packing;
    let train = crate::train::run::tokenize_examples_placed(
        &inner.tok,
        &examples,
        &places,
        &train_config,
        packing,
    )
    .map_err(js_error)?;
    let data = RunData {
        train,
        eval: Vec::new(),
    };
    let mut run = Run::start(
        inner.model.clone(),
        &inner.label,
        config,
        data,
        run_options,
        None,
    )
    .map_err(js_error)?;
    if let Some(gpu) = gpu {
        run.use_gpu(gpu.clone()).map_err(js_error)?;
    }
    Ok((run, examples.len()))
}

/// Times a training step of one fixed small model (hidden 256, two layers, 96 tokens: about 0.4 GFLOP)
/// on each executor this browser has, so that `auto` can pick the faster for this machine: resolves to
/// JSON `{"cpu_seconds": s, "gpu_seconds": s or null, "gpu_error": why null}`. Each executor's first step (shader compilation,
/// uploads) is not timed.
#[wasm_bindgen(js_name = probeExecutors)]
pub async fn probe_executors() -> Result<String, JsError> {
    let spec = synth::SynthSpec {
        hidden_size: 256,
        intermediate_size: 768,
        ..synth::SynthSpec::tiny(crate::config::Arch::Qwen2, synth::BYTE_VOCAB)
    };
    let source =
        ModelSource::open_folder(synth::model_files(&spec, &synth::byte_tokenizer(), "probe"))
            .map_err(js_error)?;
    let tok = source.chat_tokenizer().map_err(js_error)?;
    let model = Arc::new(source.load(None).map_err(js_error)?);
    // Without WebGPU (or with a device that will not open) only the CPU is timed.
    let gpu = Gpu::new_async(true).await.ok().map(Arc::new);
    let text = "nibble times one step of this text on each executor. ".repeat(2);
    let jsonl = serde_json::json!({ "text": text.trim_end() }).to_string();
    let inner = Inner {
        model,
        gpu,
        tok,
        label: "probe".into(),
        run: None,
    };
    // The timed second step of a fresh run on `gpu` (None: the CPU).
    let time_step = async |gpu: Option<&Arc<Gpu>>| -> Result<f64, JsError> {
        let (mut run, _) = start_run(
            &inner,
            gpu,
            &jsonl,
            r#"{"max_steps": 2, "lora_dropout": 0}"#,
        )?;
        run.step_async(&mut Evaluated::default())
            .await
            .map_err(js_error)?;
        let start = web_time::Instant::now();
        run.step_async(&mut Evaluated::default())
            .await
            .map_err(js_error)?;
        Ok(start.elapsed().as_secs_f64())
    };
    let cpu_seconds = time_step(None).await?;
    // A WebGPU device that opens but fails the step leaves the CPU as the answer, with the reason.
    let (gpu_seconds, gpu_error) = match inner.gpu.as_ref() {
        None => (None, Some("no WebGPU device could be opened".to_string())),
        Some(gpu) => match time_step(Some(gpu)).await {
            Ok(seconds) => (Some(seconds), None),
            Err(e) => (
                None,
                Some(String::from(
                    js_sys::Error::from(JsValue::from(e)).message(),
                )),
            ),
        },
    };
    Ok(serde_json::json!({
        "cpu_seconds": cpu_seconds,
        "gpu_seconds": gpu_seconds,
        "gpu_error": gpu_error,
    })
    .to_string())
}

/// A file's bytes, copied once into wasm memory (a 0.5B model's 1 GB must not be held twice there:
/// wasm memory never shrinks, and it ends at 4 GB).
fn copy_into_wasm(bytes: &js_sys::Uint8Array) -> Arc<[u8]> {
    let mut copy = Arc::<[u8]>::new_uninit_slice(bytes.length() as usize);
    let slice = Arc::get_mut(&mut copy).expect("a new Arc has one owner");
    // Writes every element: the lengths are equal.
    bytes.copy_to_uninit(slice);
    // SAFETY: copy_to_uninit initialised all `length()` elements just above.
    unsafe { copy.assume_init() }
}

/// The session's state, or an error while another call (an awaited step, say) still holds it.
fn lock(inner: &RefCell<Inner>) -> Result<std::cell::RefMut<'_, Inner>, JsError> {
    inner
        .try_borrow_mut()
        .map_err(|_| JsError::new("the session is busy: await the previous call first"))
}

/// The session's run, or an error naming the `call` that needs one.
fn started<'a>(inner: &'a mut Inner, call: &str) -> Result<&'a mut Run<'static>, JsError> {
    inner
        .run
        .as_mut()
        .ok_or_else(|| JsError::new(&format!("call setData before {call}")))
}

impl Session {
    fn borrow(&self) -> Result<std::cell::RefMut<'_, Inner>, JsError> {
        lock(&self.inner)
    }
}

#[wasm_bindgen]
impl Session {
    /// "webgpu (<adapter>)" or "cpu (wasm)": which executor trains.
    pub fn backend(&self) -> Result<String, JsError> {
        let inner = self.borrow()?;
        Ok(match &inner.gpu {
            // Browsers may hide the adapter's name.
            Some(g) if g.info.name.is_empty() => "webgpu".to_string(),
            Some(g) => format!("webgpu ({})", g.info.name),
            None => "cpu (wasm)".to_string(),
        })
    }

    /// The model as JSON: architecture, sizes, parameter count, weight format.
    pub fn describe(&self) -> Result<String, JsError> {
        let inner = self.borrow()?;
        let c = &inner.model.config;
        Ok(serde_json::json!({
            "model": inner.label,
            "architecture": format!("{:?}", c.arch),
            "layers": c.num_layers,
            "hidden_size": c.hidden_size,
            "vocab_size": c.vocab_size,
            "parameters": c.parameter_count(),
            "weight_bytes": inner.model.weight_bytes(),
        })
        .to_string())
    }

    /// Sets the training data (JSONL in any of TRL's three shapes) and options (JSON, keys as
    /// `nibble train`'s flags with underscores: lr, epochs, lora_r, eval_split, ...), and starts a fresh
    /// run.
    #[wasm_bindgen(js_name = setData)]
    pub fn set_data(&self, jsonl: &str, options: &str) -> Result<String, JsError> {
        let mut inner = self.borrow()?;
        let (run, examples) = start_run(&inner, inner.gpu.as_ref(), jsonl, options)?;
        let summary = serde_json::json!({
            "examples": examples,
            "total_steps": run.trainer.total_steps,
            "lora_parameters": run.trainer.adapter.parameter_count(),
        });
        inner.run = Some(run);
        Ok(summary.to_string())
    }

    /// Whether the run has done all its steps.
    pub fn done(&self) -> Result<bool, JsError> {
        Ok(self.borrow()?.run.as_ref().is_none_or(|r| r.done()))
    }

    /// One optimizer step; resolves to its record as JSON (step, epoch, loss, lr, grad_norm, tokens,
    /// tokens_per_s, mean_token_accuracy, entropy, eval_loss when a validation pass fell due,
    /// eval_loss_at_start before the first step with eval_on_start, and on WebGPU gpu_bytes: the device
    /// memory in use, scratch at its high-water mark).
    pub fn step(&self) -> js_sys::Promise {
        let inner = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let mut guard = lock(&inner)?;
            let run = started(&mut guard, "step")?;
            let mut evaluated = Evaluated::default();
            let record: StepRecord = run.step_async(&mut evaluated).await.map_err(js_error)?;
            let mut json = record.to_json();
            for (step, loss) in evaluated.0 {
                let key = match step == record.step {
                    true => "eval_loss",
                    false => "eval_loss_at_start",
                };
                json[key] = loss.into();
            }
            if let Some(bytes) = run.trainer.gpu_bytes() {
                json["gpu_bytes"] = bytes.into();
            }
            Ok(JsValue::from_str(&json.to_string()))
        })
    }

    /// Greedy answer to `prompt` as a user turn (chat template applied), up to `max_new` tokens, with the
    /// adapter trained so far (none before `setData`): resolves to JSON `{answer, tokens, seconds}`
    /// (tokens generated, the stop token included, and the time they took with the prompt's).
    pub fn generate(&self, prompt: String, max_new: u32) -> js_sys::Promise {
        let inner = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let guard = lock(&inner)?;
            let g = &*guard;
            // On WebGPU when training runs there, with the device's copies of the adapters.
            let executor = g.run.as_ref().and_then(|r| r.trainer.executor()).unwrap_or(
                crate::generate::Executor::Cpu {
                    model: &g.model,
                    adapter: None,
                },
            );
            let start = web_time::Instant::now();
            let answer = crate::generate::answer_async(executor, &g.tok, &prompt, max_new as usize)
                .await
                .map_err(js_error)?;
            let json = serde_json::json!({
                "answer": answer.text,
                "tokens": answer.tokens,
                "seconds": start.elapsed().as_secs_f64(),
            });
            Ok(JsValue::from_str(&json.to_string()))
        })
    }

    /// The adapter as a PEFT folder's files: resolves to an object with `adapter_model.safetensors`
    /// (Uint8Array) and `adapter_config.json` (string).
    #[wasm_bindgen(js_name = exportAdapter)]
    pub fn export_adapter(&self) -> js_sys::Promise {
        let inner = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let mut guard = lock(&inner)?;
            let run = started(&mut guard, "exportAdapter")?;
            let (weights, config) = run.peft_files_async().await.map_err(js_error)?;
            let out = js_sys::Object::new();
            js_sys::Reflect::set(
                &out,
                &"adapter_model.safetensors".into(),
                &js_sys::Uint8Array::from(weights.as_slice()),
            )?;
            js_sys::Reflect::set(&out, &"adapter_config.json".into(), &config.into())?;
            Ok(out.into())
        })
    }
}
