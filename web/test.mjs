// Drives the page in headless Chromium with WebGPU on SwiftShader: loads the built-in model, trains a
// fixed number of steps, asks a question, exports the adapter, and checks that the WebGPU executor ran,
// that the loss fell, and that generation returned text; then loads a model folder from disk (as a user
// picking a Hugging Face folder) and stops a run with the Stop button; then runs the CPU (wasm) executor.
// Usage: node test.mjs URL STEPS OUT_DIR MODEL_FOLDER
import { chromium } from "playwright-core";
import { mkdirSync, writeFileSync } from "node:fs";

const [url, stepsArg, outDir, folder] = process.argv.slice(2);
const steps = Number(stepsArg || 30);
mkdirSync(outDir, { recursive: true });

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--enable-unsafe-webgpu", "--enable-features=Vulkan", "--use-angle=swiftshader",
    "--use-webgpu-adapter=swiftshader", "--enable-unsafe-swiftshader",
    "--no-sandbox", "--disable-background-networking", "--disable-component-update",
  ],
});
let failed = false;
const check = (ok, what) => {
  console.log(`${ok ? "ok  " : "FAIL"} ${what}`);
  failed ||= !ok;
};
try {
  const page = await browser.newPage({ viewport: { width: 1000, height: 1400 } });
  page.on("console", (m) => console.log(`[page] ${m.text()}`));
  page.on("pageerror", (e) => console.log(`[page error] ${e.message}`));
  await page.goto(url);
  await page.waitForFunction(() => window.nibble && (window.nibble.ready || window.nibble.error), null, { timeout: 120_000 });
  let s = await page.evaluate(() => window.nibble);
  if (s.error) throw new Error(`loading failed: ${s.error}`);
  console.log(`executor: ${s.backend}`);
  check(s.backend.startsWith("webgpu"), "the WebGPU executor runs");

  await page.click("#ask");
  await page.waitForFunction(() => window.nibble.answers.length > 0 || window.nibble.error, null, { timeout: 120_000 });
  s = await page.evaluate(() => window.nibble);
  console.log(`answer before training: ${JSON.stringify(s.answers[0]?.answer)}`);

  await page.fill("#max-steps", String(steps));
  const started = Date.now();
  await page.click("#train");
  await page.waitForFunction(() => window.nibble.finished || window.nibble.error, null, { timeout: 900_000 });
  const seconds = (Date.now() - started) / 1000;
  s = await page.evaluate(() => window.nibble);
  if (s.error) throw new Error(`training failed: ${s.error}`);
  const [first, last] = [s.losses[0], s.losses[s.losses.length - 1]];
  console.log(`trained ${s.losses.length} steps in ${seconds.toFixed(1)} s (${(s.losses.length / seconds).toFixed(2)} steps/s)`);
  console.log(`first loss ${first.toFixed(4)}, last loss ${last.toFixed(4)}`);
  check(s.losses.length === steps, `ran ${steps} steps`);
  check(last < 0.8 * first, "the loss fell by more than 20%");

  await page.click("#ask");
  await page.waitForFunction(() => window.nibble.answers.length > 1 || window.nibble.error, null, { timeout: 120_000 });
  s = await page.evaluate(() => window.nibble);
  const answer = s.answers[1]?.answer ?? "";
  console.log(`answer after training: ${JSON.stringify(answer)}`);
  check(answer.length > 0, "generation after training returns text");

  await page.click("#download");
  await page.waitForFunction(() => window.nibble.adapterConfig || window.nibble.error, null, { timeout: 60_000 });
  s = await page.evaluate(() => window.nibble);
  console.log(`adapter: adapter_model.safetensors (${s.adapterBytes} bytes) + adapter_config.json:\n${s.adapterConfig}`);
  const config = JSON.parse(s.adapterConfig);
  check(config.peft_type === "LORA" && config.target_modules.length === 7, "the adapter is a PEFT LoRA config");

  await page.screenshot({ path: `${outDir}/screenshot.png`, fullPage: true });

  // A model folder picked from disk, then Stop partway through a run.
  await page.check('input[name="model"][value="folder"]');
  await page.setInputFiles("#folder", folder);
  await page.click("#load");
  await page.waitForFunction(() => window.nibble.ready || window.nibble.error, null, { timeout: 120_000 });
  s = await page.evaluate(() => window.nibble);
  if (s.error) throw new Error(`loading the folder failed: ${s.error}`);
  const described = await page.textContent("#model-info");
  console.log(`loaded from disk: ${described}`);
  check(described.includes("Llama"), "a model folder picked from disk loads");
  await page.fill("#max-steps", "");
  await page.click("#train");
  await page.waitForFunction(() => window.nibble.losses.length >= 2 || window.nibble.error, null, { timeout: 300_000 });
  await page.click("#stop");
  await page.waitForFunction(() => window.nibble.finished || window.nibble.error, null, { timeout: 300_000 });
  s = await page.evaluate(() => window.nibble);
  if (s.error) throw new Error(`training the folder model failed: ${s.error}`);
  check(s.losses.length >= 2 && s.losses.length < 20, `Stop ends the run early (after ${s.losses.length} steps)`);
  await page.check('input[name="model"][value="builtin"]');
  await page.fill("#max-steps", String(steps));

  // The same steps on the CPU executor compiled to wasm (the fallback for browsers without WebGPU).
  await page.selectOption("#device", "cpu");
  await page.click("#load");
  await page.waitForFunction(() => window.nibble.ready || window.nibble.error, null, { timeout: 120_000 });
  const cpuStarted = Date.now();
  await page.click("#train");
  await page.waitForFunction(() => window.nibble.finished || window.nibble.error, null, { timeout: 900_000 });
  const cpuSeconds = (Date.now() - cpuStarted) / 1000;
  const c = await page.evaluate(() => window.nibble);
  if (c.error) throw new Error(`CPU training failed: ${c.error}`);
  console.log(`${c.backend}: ${c.losses.length} steps in ${cpuSeconds.toFixed(1)} s ` +
    `(${(c.losses.length / cpuSeconds).toFixed(2)} steps/s), loss ${c.losses[0].toFixed(4)} -> ${c.losses.at(-1).toFixed(4)}`);
  check(c.backend === "cpu (wasm)" && Math.abs(c.losses[0] - first) < 1e-3 * first,
    "the wasm CPU executor starts from the same loss as WebGPU");

  writeFileSync(`${outDir}/result.json`, JSON.stringify({ backend: s.backend, steps: s.losses.length, seconds,
    steps_per_s: s.losses.length / seconds, first_loss: first, last_loss: last, answer,
    cpu_wasm_steps_per_s: c.losses.length / cpuSeconds }, null, 2));
  console.log(`screenshot: ${outDir}/screenshot.png`);
} catch (e) {
  console.log(`FAIL ${e.message}`);
  failed = true;
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
