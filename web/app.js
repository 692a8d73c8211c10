// The page: its controls, chart and answers. The model, executor and training run live in a Web Worker
// (worker.js), so a long step never freezes the page: it keeps repainting, and Stop is heard between
// steps.

const $ = (id) => document.getElementById(id);
// What tests (web/test.mjs) and curious users read: the state of the page.
const state = (window.nibble = {
  ready: false, backend: null, executor: null, probe: null, losses: [], evalLosses: [], tokensPerS: [],
  stepSeconds: [], finished: false, answers: [], error: null, ticks: 0, slowTicks: 0, maxTickGapMs: 0,
  stoppedAfterMs: null,
});

const worker = new Worker("./worker.js", { type: "module" });
const pending = new Map();
let nextId = 1;
let onStep = null;
let stopClickedAt = null;
let training = false;
let total = 0;
let stepStarted = 0;

// One request to the worker; resolves with its reply (or rejects with its error).
// `started` hears a train request's "started" message (the run's summary), before its steps.
function request(type, fields = {}, transfer = [], started = null) {
  const id = nextId++;
  const reply = new Promise((resolve, reject) => pending.set(id, { resolve, reject, started }));
  worker.postMessage({ id, type, ...fields }, transfer);
  return reply;
}

worker.onmessage = ({ data }) => {
  if (data.wasmBytes) showMemory(data.wasmBytes);
  if (data.type === "step") return onStep?.(data);
  const waiting = pending.get(data.id);
  if (!waiting) return;
  if (data.type === "started") return waiting.started?.(data);
  pending.delete(data.id);
  if (data.error) waiting.reject(new Error(data.error));
  else waiting.resolve(data);
};
worker.onerror = (e) => {
  const error = new Error(e.message || "the worker failed to start");
  for (const waiting of pending.values()) waiting.reject(error);
  pending.clear();
  fail(error, "worker");
};

// The page's own heartbeat: the gaps between its ticks while training say whether the page stayed
// responsive (web/test.mjs reads them).
let lastTick = performance.now();
setInterval(() => {
  const now = performance.now();
  if (training) {
    state.ticks += 1;
    state.slowTicks += now - lastTick > 100 ? 1 : 0;
    state.maxTickGapMs = Math.max(state.maxTickGapMs, now - lastTick);
    showProgress();
  }
  lastTick = now;
}, 20);

// What is running: "load", "train", "ask" or "export" (one at a time), or null.
let busy = null;

// The buttons and inputs for the page's state: while something runs, only Stop (of a run) can be
// pressed, and the model cannot be changed under a load or a run.
function updateButtons() {
  const idle = busy === null;
  $("load").disabled = !idle;
  $("train").disabled = $("ask").disabled = !(idle && state.ready);
  $("download").disabled = !(idle && state.ready && state.hasRun);
  $("stop").disabled = busy !== "train" || stopClickedAt !== null;
  const fixed = busy === "load" || busy === "train";
  for (const input of [...document.querySelectorAll('input[name="model"]'), $("folder"), $("device")]) input.disabled = fixed;
}

// Runs one action at a time; its error is shown with what to do next.
const guard = (name, action) => async () => {
  if (busy) return;
  busy = name;
  updateButtons();
  try {
    await action();
  } catch (e) {
    fail(e, name);
  } finally {
    busy = null;
    training = state.running = false;
    updateButtons();
  }
};

function fail(e, during) {
  state.error = String(e && e.message ? e.message : e);
  const next = during === "load" || !state.ready ? "choose a model and press Load" : "fix it and press Train again";
  $("status").textContent = `error: ${state.error} (${next})`;
  console.error(state.error);
}

// A model choice that differs from the loaded one: nothing trains until Load.
function modelChoiceChanged() {
  state.ready = false;
  updateButtons();
  $("status").textContent = "press Load to load the chosen model";
}

function folderFiles() {
  const files = [...$("folder").files];
  if (files.length === 0) throw new Error("pick a model folder first");
  // webkitRelativePath keeps the folder's name ("Qwen2.5-0.5B-Instruct/config.json"); the worker reads
  // the bytes.
  return files.map((f) => [f.webkitRelativePath || f.name, f]);
}

// What WebGPU adapter this browser offers, and whether it is a software renderer (SwiftShader, llvmpipe,
// WARP): those run GPU code on the CPU, far slower than the wasm CPU executor.
async function webgpuAdapter() {
  if (!navigator.gpu) return null;
  const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
  if (!adapter) return null;
  const info = adapter.info || {};
  const name = [info.vendor, info.architecture, info.device, info.description].filter(Boolean).join(" ");
  const software = Boolean(info.isFallbackAdapter || adapter.isFallbackAdapter) ||
    /swiftshader|llvmpipe|lavapipe|softpipe|warp|basic render/i.test(name);
  return { name: name || "unnamed adapter", software };
}

// Bump when the executors' speed changes, so that a remembered probe is timed again.
const PROBE_VERSION = 2;

function rememberedProbe(key) {
  try {
    return JSON.parse(localStorage.getItem(key) || "null");
  } catch {
    return null;
  }
}

// "auto": the executor that ran the probe's step faster here (remembered per adapter).
async function chooseExecutor() {
  const adapter = await webgpuAdapter();
  state.adapter = adapter;
  if (!adapter) return { device: "cpu", why: "this browser has no WebGPU" };
  const key = `nibble-probe-v${PROBE_VERSION}:${adapter.name}`;
  let probe = rememberedProbe(key);
  if (!probe) {
    $("backend").textContent = "timing a step on WebGPU and on the CPU…";
    probe = (await request("probe")).probe;
    // A WebGPU failure may be passing: only complete timings are kept.
    if (probe.gpu_seconds != null) {
      try {
        localStorage.setItem(key, JSON.stringify(probe));
      } catch {
        // Storage may be off; the probe then runs at each visit.
      }
    }
  }
  state.probe = probe;
  const cpu = `CPU ${(probe.cpu_seconds * 1000).toFixed(0)} ms`;
  const software = adapter.software ? `; ${adapter.name} is a software renderer (it runs GPU code on the CPU)` : "";
  if (probe.gpu_seconds == null) return { device: "cpu", why: `WebGPU failed the probe step (${probe.gpu_error}); ${cpu}` };
  const times = `probe step: WebGPU ${(probe.gpu_seconds * 1000).toFixed(0)} ms, ${cpu}`;
  return { device: probe.gpu_seconds < probe.cpu_seconds ? "gpu" : "cpu", why: `faster here (${times})${software}` };
}

async function load() {
  state.ready = false;
  state.error = null;
  $("status").textContent = "";
  $("backend").textContent = "loading…";
  const useFolder = document.querySelector('input[name="model"]:checked').value === "folder";
  let device = $("device").value, why = "as chosen under Device";
  if (device === "auto") ({ device, why } = await chooseExecutor());
  $("backend").textContent = "loading…";
  const loaded = await request("load", { files: useFolder ? folderFiles() : null, device });
  state.backend = loaded.backend;
  state.executor = describeExecutor(loaded.backend, why);
  $("backend").textContent = state.executor;
  const info = loaded.info;
  $("model-info").textContent = `${info.model}: ${info.architecture}, ${info.layers} layers, ` +
    `${info.parameters.toLocaleString()} parameters, ${mb(info.weight_bytes)} of weights`;
  // A new model has not been trained yet.
  $("gpu-memory").textContent = $("adapter").textContent = "";
  state.model = info.model;
  Object.assign(state, { losses: [], evalLosses: [], tokensPerS: [], stepSeconds: [], finished: false, hasRun: false,
    gpuBytes: null });
  drawChart();
  state.ready = true;
  $("status").textContent = "loaded: press Train, or Ask to hear it before training";
}

function describeExecutor(backend, why) {
  const gpu = backend.startsWith("webgpu");
  const name = gpu ? `WebGPU on ${state.adapter?.name || backend.slice(7).replace(/[()]/g, "") || "an unnamed adapter"}` +
    (state.adapter?.software ? " (software: slow)" : "") : "CPU executor in wasm (1 thread)";
  return `${name}: ${why}`;
}

function showMemory(bytes) {
  state.wasmBytes = bytes;
  $("memory").textContent = `wasm memory ${mb(bytes)} (its peak: it never shrinks)`;
}

const mb = (bytes) => `${(bytes / 1e6).toFixed(bytes < 1e7 ? 1 : 0)} MB`;

// The demo preset (what `nibble demo` trains with): the fields' starting values, and its max_length.
let preset = {};

function fillDefaults(presetJson) {
  preset = JSON.parse(presetJson);
  const fields = { "lora-r": "lora_r", "lora-alpha": "lora_alpha", "lora-dropout": "lora_dropout", lr: "lr", epochs: "epochs",
    schedule: "lr_scheduler" };
  for (const [id, key] of Object.entries(fields)) if (preset[key] != null) $(id).value = preset[key];
}

function options() {
  const num = (id) => Number($(id).value);
  const o = {
    max_length: preset.max_length ?? 512, lora_r: num("lora-r"), lora_alpha: num("lora-alpha"), lora_dropout: num("lora-dropout"),
    lr: num("lr"), epochs: num("epochs"), grad_accum: num("grad-accum"), lr_scheduler: $("schedule").value,
  };
  if ($("max-steps").value !== "") o.max_steps = num("max-steps");
  if ($("eval-split").value !== "") o.eval_split = num("eval-split");
  if ($("eval-steps").value !== "") o.eval_steps = num("eval-steps");
  return o;
}

function drawChart() {
  const c = $("chart"), g = c.getContext("2d"), l = state.losses, e = state.evalLosses;
  g.clearRect(0, 0, c.width, c.height);
  g.fillStyle = "#666";
  g.strokeStyle = "#bbb";
  g.font = "12px sans-serif";
  if (l.length === 0) return;
  const all = [...l, ...e.map((p) => p.loss)];
  const max = Math.max(...all), min = Math.min(...all, 0);
  const [left, right, top, bottom] = [48, c.width - 10, 10, c.height - 34];
  const x = (step) => left + ((step - 1) / Math.max(1, l.length - 1)) * (right - left);
  const y = (v) => top + (1 - (v - min) / (max - min || 1)) * (bottom - top);
  // Axes, with the loss at the top, middle and bottom, and the first and last step.
  g.beginPath(); g.moveTo(left, top); g.lineTo(left, bottom); g.lineTo(right, bottom); g.stroke();
  for (const v of [max, (max + min) / 2, min]) g.fillText(v.toFixed(2), 4, y(v) + 4);
  g.fillText("1", left - 3, bottom + 14);
  g.fillText(String(l.length), right - 20, bottom + 14);
  const tps = state.tokensPerS.at(-1);
  g.fillText(`loss (y) per optimizer step (x) · training (blue)${e.length ? ", validation (orange)" : ""}` +
    ` · ${tps.toFixed(0)} tokens/s`, left + 20, c.height - 4);
  g.fillStyle = g.strokeStyle = "#2563eb";
  g.beginPath();
  l.forEach((v, i) => (i ? g.lineTo(x(i + 1), y(v)) : g.moveTo(x(i + 1), y(v))));
  g.stroke();
  // The latest step as a dot (a single step draws no line).
  g.fillRect(x(l.length) - 2, y(l.at(-1)) - 2, 5, 5);
  g.fillStyle = g.strokeStyle = "#ea580c";
  g.beginPath();
  e.forEach((p, i) => (i ? g.lineTo(x(p.step), y(p.loss)) : g.moveTo(x(p.step), y(p.loss))));
  g.stroke();
  for (const p of e) g.fillRect(x(p.step) - 2, y(p.loss) - 2, 5, 5);
}

function showProgress() {
  const done = state.losses.length;
  if (done >= total) return;
  const running = ((performance.now() - stepStarted) / 1000).toFixed(1);
  // The steps so far say how long this one will take (the first step has nothing to go by).
  const recent = state.stepSeconds.slice(-5);
  const expected = recent.length ? ` of about ${(recent.reduce((a, b) => a + b) / recent.length).toFixed(1)} s` : "";
  const last = done ? ` · loss ${state.losses.at(-1).toFixed(4)} · ${state.tokensPerS.at(-1).toFixed(0)} tokens/s` : "";
  const stopping = stopClickedAt ? " · stopping after this step" : "";
  const text = `step ${done + 1}/${total} running for ${running} s${expected}${last}${stopping}`;
  // Only a changed line is drawn again (ten times a second).
  if ($("status").textContent !== text) $("status").textContent = text;
}

async function train() {
  state.error = null;
  state.finished = false;
  stopClickedAt = null;
  const ended = await request("train", { data: $("data").value, options: options() }, [], ({ summary }) => {
    // The worker took the data: a new run, with nothing drawn yet.
    Object.assign(state, { running: true, finished: false, hasRun: true, losses: [], evalLosses: [], tokensPerS: [], stepSeconds: [],
      ticks: 0, slowTicks: 0, maxTickGapMs: 0, stoppedAfterMs: null, stopped: false });
    drawChart();
    total = summary.total_steps;
    stepStarted = performance.now();
    training = true;
  });
  training = state.running = false;
  if (stopClickedAt) state.stoppedAfterMs = performance.now() - stopClickedAt;
  state.stopped = ended.stopped;
  const last = state.losses.length ? ` · final loss ${state.losses.at(-1).toFixed(4)}` : "";
  $("status").textContent = `${ended.stopped ? "stopped" : "done"} after ${ended.steps} steps${last}` +
    (state.evalLosses.length ? ` · validation loss ${state.evalLosses.at(-1).loss.toFixed(4)}` : "") +
    ": ask it something, or download the adapter";
  state.finished = true;
}

onStep = ({ record, seconds }) => {
  state.losses.push(record.loss);
  state.tokensPerS.push(record.tokens_per_s);
  state.stepSeconds.push(seconds);
  if (record.eval_loss != null) state.evalLosses.push({ step: record.step, loss: record.eval_loss });
  if (record.gpu_bytes != null) {
    state.gpuBytes = record.gpu_bytes;
    $("gpu-memory").textContent = ` · GPU memory ${mb(record.gpu_bytes)} (weights, adapters, optimizer state, the steps' peak)`;
  }
  stepStarted = performance.now();
  drawChart();
};

function stop() {
  if (busy !== "train" || stopClickedAt) return;
  stopClickedAt = performance.now();
  worker.postMessage({ type: "stop" });
  updateButtons();
  showProgress();
}

async function ask() {
  const prompt = $("prompt").value;
  const { answer, tokens, seconds } = await request("ask", { prompt, maxNew: Number($("answer-tokens").value) });
  const when = `${state.model}, ${state.losses.length ? `after ${state.losses.length} steps` : "before training"}`;
  state.answers.push({ prompt, answer, when, tokens, seconds });
  $("answers").textContent += `[${when}] ${prompt}\n→ ${JSON.stringify(answer)} ` +
    `(${tokens} tokens in ${seconds.toFixed(1)} s with the prompt)\n`;
}

async function download() {
  const { files } = await request("export");
  state.adapterConfig = files["adapter_config.json"];
  state.adapterBytes = files["adapter_model.safetensors"].length;
  $("adapter").textContent = state.adapterConfig;
  for (const [name, type] of [["adapter_model.safetensors", "application/octet-stream"], ["adapter_config.json", "application/json"]]) {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([files[name]], { type }));
    a.download = name;
    a.click();
  }
}

$("load").onclick = guard("load", load);
$("train").onclick = guard("train", train);
$("stop").onclick = stop;
$("ask").onclick = guard("ask", ask);
$("download").onclick = guard("export", download);
for (const input of document.querySelectorAll('input[name="model"]')) input.onchange = modelChoiceChanged;
$("folder").onchange = modelChoiceChanged;
$("device").onchange = modelChoiceChanged;

await guard("load", async () => {
  const { demoData, demoOptions } = await request("init");
  $("data").value = demoData;
  fillDefaults(demoOptions);
  await load();
})();
