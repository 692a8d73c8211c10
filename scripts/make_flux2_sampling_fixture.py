"""Writes tests/fixtures/flux2/tiny_sampling.safetensors: what diffusers (0.42.x) Flux2KleinPipeline computes when it
samples an image, on the tiny transformer of tests/fixtures/flux2/tiny/transformer (scripts/make_flux2_fixture.py)
and the tiny VAE of tests/fixtures/flux2/tiny_vae (scripts/make_flux2_vae_fixture.py), with klein's scheduler:

  FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
      base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")

(the config FLUX.2 [klein] pipelines ship in scheduler/scheduler_config.json; with dynamic shifting the pipeline's
own mu, compute_empirical_mu(image tokens, steps), replaces the scheduler's shift).

The prompt's features and the empty negative prompt's are given (random, 7 tokens of 256) instead of the text
encoder's (tests/flux2.rs checks those separately), and so are the starting latents, since torch's generator is not
nibble's. Two runs, 48 x 32 pixels (a 3 x 2 token grid):
  cfg.*      4 steps, guidance_scale 4.0 (the base model's default: classifier-free guidance against "")
  plain.*    3 steps, guidance_scale 1.0 (no guidance: one transformer pass per step)
  ref.*      3 steps, guidance_scale 4.0, with two reference images (the pipeline's image=: tests/fixtures/flux2/
             reference-0.png, 76 x 66 pixels, its centre cropped to 64 x 64; reference-1.png, 80 x 64, kept whole)
Each: {run}.sigmas (steps + 1, the scheduler's, ending in 0), {run}.step{i} (the packed latents after step i,
from callback_on_step_end), {run}.image (48, 32, 3: output_type "np", in [0, 1]). Also ref.tokens (36, 128: the
references' packed latent tokens, 16 then 20, as prepare_image_latents makes them) and ref.ids (36, 4).
Inputs: prompt_embeds (7, 256), negative_prompt_embeds (7, 256), latents (6, 128: the packed starting noise).
Schedules alone (scheduler.set_timesteps with the pipeline's sigmas and mu): schedule.4096x50 (1024 px, 50 steps)
and schedule.9216x28 (1536 px, past compute_empirical_mu's 4300-token bend), each steps + 1 long.

Run from the repository root (CPU, one thread; a few seconds):
    /tmp/hfvenv/bin/python scripts/make_flux2_sampling_fixture.py
"""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import PIL.Image
import torch
import diffusers
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, \
    Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from safetensors.torch import save_file

torch.set_num_threads(1)
diffusers.utils.logging.set_verbosity_error()

FIXTURES = os.path.join("tests", "fixtures", "flux2")
OUT = os.path.join(FIXTURES, "tiny_sampling.safetensors")
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
H, W = 48, 32


def pipeline():
    transformer = Flux2Transformer2DModel.from_pretrained(os.path.join(FIXTURES, "tiny", "transformer"),
                                                          torch_dtype=torch.float32).eval()
    vae = AutoencoderKLFlux2.from_pretrained(os.path.join(FIXTURES, "tiny_vae"), torch_dtype=torch.float32).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                              transformer=transformer, is_distilled=False)


def schedule(seq_len, steps):
    s = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    s.set_timesteps(steps, sigmas=sigmas, mu=compute_empirical_mu(image_seq_len=seq_len, num_steps=steps))
    return s.sigmas.clone()


def main():
    if not diffusers.__version__.startswith("0.42"):
        print(f"warning: written against diffusers 0.42.x, found {diffusers.__version__}", file=sys.stderr)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randn(1, 7, 256, generator=g)
    negative = torch.randn(1, 7, 256, generator=g)
    start = torch.randn(1, 128, H // 16, W // 16, generator=g)
    out = {"prompt_embeds": prompt[0], "negative_prompt_embeds": negative[0],
           "latents": start.reshape(1, 128, -1).permute(0, 2, 1)[0]}
    pipe = pipeline()
    rng = np.random.default_rng(11)
    references = []
    for k, (w, h) in enumerate([(76, 66), (80, 64)]):
        # Smooth pictures with some grain, as photographs are, rather than pure noise.
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([128 + 100 * np.sin(x / (5 + 3 * c + k) + y / (7 + c)) for c in range(3)], -1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = os.path.join(FIXTURES, f"reference-{k}.png")
        PIL.Image.fromarray(pixels, "RGB").save(path)
        references.append(PIL.Image.open(path).convert("RGB"))
    # The references as the pipeline's step 4 prepares them, then its prepare_image_latents.
    prepared = []
    for img in references:
        w, h = img.size
        assert w * h <= 1024 * 1024
        w, h = w // 16 * 16, h // 16 * 16
        prepared.append(pipe.image_processor.preprocess(img, height=h, width=w, resize_mode="crop"))
    with torch.no_grad():
        tokens, ids = pipe.prepare_image_latents(prepared, 1, None, torch.device("cpu"), torch.float32)
    out["ref.tokens"], out["ref.ids"] = tokens[0], ids[0].to(torch.float32)
    assert tokens.shape == (1, 16 + 20, 128), tokens.shape
    for run, steps, guidance, image in [("cfg", 4, 4.0, None), ("plain", 3, 1.0, None),
                                        ("ref", 3, 4.0, references)]:
        seen = []

        def keep(_pipe, i, _t, kwargs):
            seen.append(kwargs["latents"][0].clone())
            return {}

        with torch.no_grad():
            image = pipe(image=image, prompt_embeds=prompt, negative_prompt_embeds=negative, latents=start.clone(),
                         height=H, width=W, num_inference_steps=steps, guidance_scale=guidance,
                         output_type="np", callback_on_step_end=keep).images[0]
        out[f"{run}.sigmas"] = pipe.scheduler.sigmas.clone()
        for i, lat in enumerate(seen):
            out[f"{run}.step{i}"] = lat
        out[f"{run}.image"] = torch.from_numpy(np.ascontiguousarray(image))
        moved = (seen[-1] - out["latents"]).abs().mean().item()
        print(f"{run}: sigmas {[round(x, 5) for x in out[f'{run}.sigmas'].tolist()]}, latents moved {moved:.3f}, "
              f"image mean {image.mean():.3f}")
        assert len(seen) == steps and moved > 0.1
    a, b = out["cfg.step0"], out["plain.step0"]
    assert (a - b).abs().max() > 1e-3  # guidance changed the first step
    assert (out["ref.step0"] - a).abs().max() > 1e-3  # so did the references
    for seq, steps in [(4096, 50), (9216, 28)]:
        out[f"schedule.{seq}x{steps}"] = schedule(seq, steps)
    save_file({k: v.to(torch.float32).contiguous() for k, v in out.items()}, OUT,
              metadata={"diffusers": diffusers.__version__, "torch": torch.__version__,
                        "script": "scripts/make_flux2_sampling_fixture.py"})
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
