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
function request(type, fields = {}, transfer = []) {
  const id = nextId++;
  worker.postMessage({ id, type, ...fields }, transfer);
  return new Promise((resolve, reject) => pending.set(id, { resolve, reject }));
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
worker.onerror = (e) => fail(e.message || "the worker failed to start");

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

function fail(e) {
  state.error = String(e && e.message ? e.message : e);
  training = false;
  $("status").textContent = "error: " + state.error + (state.ready ?
    " (fix it and press Train again)" : " (choose a model and press Load)");
  console.error(state.error);
  // Whatever failed, the buttons show what can be pressed next.
  $("stop").disabled = true;
  $("load").disabled = false;
  if (state.ready) $("train").disabled = $("ask").disabled = false;
}

// A model choice that differs from the loaded one: nothing trains until Load.
function modelChoiceChanged() {
  state.ready = false;
  $("train").disabled = $("ask").disabled = $("download").disabled = true;
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

// "auto": the executor that ran the probe's step faster here (kept per adapter across visits).
async function chooseExecutor() {
  const adapter = await webgpuAdapter();
  state.adapter = adapter;
  if (!adapter) return { device: "cpu", why: "this browser has no WebGPU" };
  const key = `nibble-probe:${adapter.name}`;
  let probe = JSON.parse(localStorage.getItem(key) || "null");
  if (!probe) {
    $("backend").textContent = "timing a step on WebGPU and on the CPU…";
    probe = (await request("probe")).probe;
    localStorage.setItem(key, JSON.stringify(probe));
  }
  state.probe = probe;
  const times = `probe step: WebGPU ${(probe.gpu_seconds * 1000).toFixed(0)} ms, CPU ${(probe.cpu_seconds * 1000).toFixed(0)} ms`;
  const software = adapter.software ? `; ${adapter.name} is a software renderer (it runs GPU code on the CPU)` : "";
  return probe.gpu_seconds != null && probe.gpu_seconds < probe.cpu_seconds
    ? { device: "gpu", why: `faster here (${times})${software}` }
    : { device: "cpu", why: `faster here (${times})${software}` };
}

async function load() {
  state.ready = false;
  state.error = null;
  $("status").textContent = "";
  $("train").disabled = $("ask").disabled = $("download").disabled = $("load").disabled = true;
  $("backend").textContent = "loading…";
  const useFolder = document.querySelector('input[name="model"]:checked').value === "folder";
  let device = $("device").value, why = "chosen";
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
  $("gpu-memory").textContent = "";
  Object.assign(state, { losses: [], evalLosses: [], tokensPerS: [], stepSeconds: [], finished: false });
  drawChart();
  state.ready = true;
  $("load").disabled = false;
  $("train").disabled = $("ask").disabled = false;
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
  g.strokeStyle = "#2563eb";
  g.beginPath();
  l.forEach((v, i) => (i ? g.lineTo(x(i + 1), y(v)) : g.moveTo(x(i + 1), y(v))));
  g.stroke();
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
  $("train").disabled = $("ask").disabled = $("load").disabled = true;
  $("stop").disabled = false;
  Object.assign(state, { finished: false, losses: [], evalLosses: [], tokensPerS: [], stepSeconds: [], ticks: 0, slowTicks: 0,
    maxTickGapMs: 0, stoppedAfterMs: null });
  stopClickedAt = null;
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
  const run = request("train", { data: $("data").value, options: options() });
  pending.get(nextId - 1).started = ({ summary }) => {
    total = summary.total_steps;
    stepStarted = performance.now();
    training = true;
  };
  const ended = await run;
  training = false;
  if (stopClickedAt) state.stoppedAfterMs = performance.now() - stopClickedAt;
  const last = state.losses.length ? ` · final loss ${state.losses.at(-1).toFixed(4)}` : "";
  $("status").textContent = `${ended.stopped ? "stopped" : "done"} after ${ended.steps} steps${last}` +
    (state.evalLosses.length ? ` · validation loss ${state.evalLosses.at(-1).loss.toFixed(4)}` : "") +
    ": ask it something, or download the adapter";
  state.finished = true;
  $("stop").disabled = true;
  $("train").disabled = $("ask").disabled = $("download").disabled = $("load").disabled = false;
}

function stop() {
  stopClickedAt = performance.now();
  $("stop").disabled = true;
  worker.postMessage({ type: "stop" });
  showProgress();
}

async function ask() {
  $("ask").disabled = true;
  const prompt = $("prompt").value;
  const { answer, tokens, seconds } = await request("ask", { prompt, maxNew: Number($("answer-tokens").value) });
  const when = state.losses.length ? `after ${state.losses.length} steps` : "before training";
  state.answers.push({ prompt, answer, when, tokens, seconds });
  $("answers").textContent += `[${when}] ${prompt}\n→ ${JSON.stringify(answer)} ` +
    `(${tokens} tokens in ${seconds.toFixed(1)} s with the prompt)\n`;
  $("ask").disabled = false;
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

const guard = (f) => () => f().catch(fail);
$("load").onclick = guard(load);
$("train").onclick = guard(train);
$("stop").onclick = stop;
$("ask").onclick = guard(ask);
$("download").onclick = guard(download);
for (const input of document.querySelectorAll('input[name="model"]')) input.onchange = modelChoiceChanged;
$("folder").onchange = modelChoiceChanged;
$("device").onchange = modelChoiceChanged;

try {
  const { demoData, demoOptions } = await request("init");
  $("data").value = demoData;
  fillDefaults(demoOptions);
  await load();
} catch (e) {
  fail(e);
}
