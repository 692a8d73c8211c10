// The page's trainer, in a module Web Worker: the session (model, executor, run) lives here, so a long
// step never blocks the page's repaints or its Stop button. The page (app.js) posts requests and this
// worker answers each with one reply of the same `id`; training also posts a `step` message per step.
//   {id, type: "init"}                              -> {demoData, demoOptions}
//   {id, type: "probe"}                             -> {probe: {cpu_seconds, gpu_seconds}}: one step of a
//                                                      fixed small model timed on each executor
//   {id, type: "load", files: [[path, File]] | null, device}
//                                                   -> {backend, info}
//   {id, type: "train", data, options}              -> {summary} at the start, then `step` messages,
//                                                      then {stopped, steps} when the run ends
//   {type: "stop"}                                  (no reply: the run ends after the step in flight)
//   {id, type: "ask", prompt, maxNew}               -> {answer, tokens, seconds}
//   {id, type: "export"}                            -> {files}
// A failed request answers {id, error}. Every reply and step message carries `wasmBytes`.
import init, { demoData, demoOptions, openSession, probeExecutors } from "./pkg/nibble.js";

let session = null;
let stopRequested = false;
const ready = init();
let memory = null;
// The wasm heap's size: its peak too, since wasm memory grows and never shrinks (a model's bytes read
// from disk pass through it once).
const wasmBytes = () => memory?.buffer.byteLength ?? 0;

// The path a folder's file was picked with names the model ("Qwen2.5-0.5B-Instruct/config.json"); the
// bytes are read here, off the page's thread.
async function readFiles(files) {
  return Promise.all(files.map(async ([path, file]) => [path, new Uint8Array(await file.arrayBuffer())]));
}

let running = false;

async function train(id, data, options) {
  // The run's own session: a Load meanwhile is refused, but the run must not follow one either way.
  const run = session;
  stopRequested = false;
  const summary = JSON.parse(run.setData(data, JSON.stringify(options)));
  postMessage({ id, type: "started", summary });
  let steps = 0;
  while (!stopRequested && !run.done()) {
    const started = performance.now();
    const record = JSON.parse(await run.step());
    steps += 1;
    postMessage({ type: "step", record, total: summary.total_steps, seconds: (performance.now() - started) / 1000,
      wasmBytes: wasmBytes() });
    // Lets a Stop posted during the step arrive before the next one starts.
    await new Promise((resolve) => setTimeout(resolve, 0));
  }
  return { stopped: stopRequested, steps };
}

const handlers = {
  init: async () => ({ demoData: demoData(), demoOptions: demoOptions() }),
  probe: async () => ({ probe: JSON.parse(await probeExecutors()) }),
  load: async ({ files, device }) => {
    running = true;
    try {
      // The old model goes first: wasm memory never shrinks, so two at once would keep its peak.
      session?.free();
      session = null;
      session = await openSession(files ? await readFiles(files) : null, device);
      return { backend: session.backend(), info: JSON.parse(session.describe()) };
    } finally {
      running = false;
    }
  },
  train: async ({ id, data, options }) => {
    running = true;
    try {
      return await train(id, data, options);
    } finally {
      running = false;
    }
  },
  ask: async ({ prompt, maxNew }) => JSON.parse(await session.generate(prompt, maxNew)),
  export: async () => {
    const files = await session.exportAdapter();
    const weights = files["adapter_model.safetensors"];
    return { files, transfer: [weights.buffer] };
  },
};

onmessage = async ({ data: request }) => {
  if (request.type === "stop") {
    stopRequested = true;
    return;
  }
  try {
    memory = (await ready).memory;
    const handler = handlers[request.type];
    if (!handler) throw new Error(`unknown request ${request.type}`);
    if (!["init", "probe", "load"].includes(request.type) && !session) throw new Error("load a model first");
    // One load or run at a time (the page asks so too); a run's Stop comes as its own message.
    if (running) throw new Error("a load or run is in progress: wait for it, or press Stop");
    const { transfer, ...reply } = await handler(request);
    postMessage({ id: request.id, type: "done", wasmBytes: wasmBytes(), ...reply }, transfer || []);
  } catch (e) {
    postMessage({ id: request.id, type: "done", error: String(e && e.message ? e.message : e) });
  }
};
