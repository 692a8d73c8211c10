// The page: loads nibble's wasm package, then trains with await between steps so the page stays
// responsive (WebGPU read-backs are asynchronous; the CPU executor yields to the event loop each step).
import init, { demoData, demoOptions, openSession } from "./pkg/nibble.js";


const $ = (id) => document.getElementById(id);
// What tests (web/test.mjs) and curious users read: the state of the page.
const state = (window.nibble = { ready: false, backend: null, losses: [], tokensPerS: [], finished: false, answers: [], error: null });
let session = null;
let stopRequested = false;


function fail(e) {
  state.error = String(e && e.message ? e.message : e);
  $("status").textContent = "error: " + state.error + (session && state.ready ?
    " (fix it and press Train again)" : " (choose a model and press Load)");
  console.error(state.error);
  // Whatever failed, the buttons show what can be pressed next.
  $("stop").disabled = true;
  $("load").disabled = false;
  if (session && state.ready) $("train").disabled = $("ask").disabled = false;
}

// A model choice that differs from the loaded one: nothing trains until Load.
function modelChoiceChanged() {
  state.ready = false;
  $("train").disabled = $("ask").disabled = $("download").disabled = true;
  $("status").textContent = "press Load to load the chosen model";
}

async function readFolder() {
  const files = [...$("folder").files];
  if (files.length === 0) throw new Error("pick a model folder first");
  // webkitRelativePath keeps the folder's name ("Qwen2.5-0.5B-Instruct/config.json").
  return Promise.all(files.map(async (f) => [f.webkitRelativePath || f.name, new Uint8Array(await f.arrayBuffer())]));
}

async function load() {
  state.ready = false;
  state.error = null;
  $("status").textContent = "";
  $("train").disabled = $("ask").disabled = $("download").disabled = true;
  $("backend").textContent = "loading…";
  const useFolder = document.querySelector('input[name="model"]:checked').value === "folder";
  session = await openSession(useFolder ? await readFolder() : null, $("device").value);
  state.backend = session.backend();
  $("backend").textContent = state.backend;
  const info = JSON.parse(session.describe());
  $("model-info").textContent = `${info.model}: ${info.architecture}, ${info.layers} layers, ` +
    `${info.parameters.toLocaleString()} parameters`;
  state.ready = true;
  $("train").disabled = $("ask").disabled = false;
}

// The demo preset (what `nibble demo` trains with): the fields' starting values, and its max_length.
let preset = {};

function fillDefaults() {
  preset = JSON.parse(demoOptions());
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
  return o;
}

function drawChart() {
  const c = $("chart"), g = c.getContext("2d"), l = state.losses;
  g.clearRect(0, 0, c.width, c.height);
  g.fillStyle = "#666";
  g.strokeStyle = "#bbb";
  g.font = "12px sans-serif";
  if (l.length === 0) return;
  const max = Math.max(...l), min = Math.min(...l, 0);
  const [left, right, top, bottom] = [48, c.width - 10, 10, c.height - 34];
  const x = (i) => left + (i / Math.max(1, l.length - 1)) * (right - left);
  const y = (v) => top + (1 - (v - min) / (max - min || 1)) * (bottom - top);
  // Axes, with the loss at the top, middle and bottom, and the first and last step.
  g.beginPath(); g.moveTo(left, top); g.lineTo(left, bottom); g.lineTo(right, bottom); g.stroke();
  for (const v of [max, (max + min) / 2, min]) g.fillText(v.toFixed(2), 4, y(v) + 4);
  g.fillText("1", left - 3, bottom + 14);
  g.fillText(String(l.length), right - 20, bottom + 14);
  g.fillText("training loss (y) per optimizer step (x)", left + 80, c.height - 4);
  g.strokeStyle = "#2563eb";
  g.beginPath();
  l.forEach((v, i) => (i ? g.lineTo(x(i), y(v)) : g.moveTo(x(i), y(v))));
  g.stroke();
}

async function train() {
  state.error = null;
  $("train").disabled = $("ask").disabled = true;
  $("stop").disabled = false;
  stopRequested = false;
  state.finished = false;
  state.losses = [];
  state.tokensPerS = [];
  const summary = JSON.parse(session.setData($("data").value, JSON.stringify(options())));
  while (!stopRequested && !session.done()) {
    const r = JSON.parse(await session.step());
    state.losses.push(r.loss);
    state.tokensPerS.push(r.tokens_per_s);
    $("status").textContent = `step ${r.step}/${summary.total_steps} · loss ${r.loss.toFixed(4)} · ` +
      `${r.tokens_per_s.toFixed(0)} tokens/s on ${state.backend}`;
    drawChart();
    await new Promise((resolve) => setTimeout(resolve, 0));
  }
  state.finished = true;
  $("stop").disabled = true;
  $("train").disabled = $("ask").disabled = $("download").disabled = false;
}

async function ask() {
  $("ask").disabled = true;
  const prompt = $("prompt").value;
  const answer = await session.generate(prompt, 48);
  const when = state.losses.length ? `after ${state.losses.length} steps` : "before training";
  state.answers.push({ prompt, answer, when });
  $("answers").textContent += `[${when}] ${prompt}\n→ ${JSON.stringify(answer)}\n`;
  $("ask").disabled = false;
}

async function download() {
  const files = await session.exportAdapter();
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
$("stop").onclick = () => { stopRequested = true; };
$("ask").onclick = guard(ask);
$("download").onclick = guard(download);
for (const input of document.querySelectorAll('input[name="model"]')) input.onchange = modelChoiceChanged;
$("folder").onchange = modelChoiceChanged;
$("device").onchange = modelChoiceChanged;

await init();
$("data").value = demoData();
fillDefaults();
await load().catch(fail);
