"""Soak: 100 randomised prompts through one REAL ComfyUI server (issue 6).

Method, variable-denoise mode, grid/quadtree, overlap, tile batch size, sampler, scheduler, image
size, txt2img/img2img, batch 1-2 and SpotDiffusion shift parameters are drawn from a seeded RNG
(``QTD_SOAK_SEED``, default 6).  Prompts are queued ten at a time, back to back.  Asserted:

* zero failures (every prompt succeeds, no traceback in the server log, the server stays up);
* identical prompts (15 repeats of earlier, non-adjacent prompts) give bit-identical latents, and
  ComfyUI really re-ran their sampler (not served from its cache);
* the server's resident memory after the last prompt is within 10% of its value after the tenth
  (the first ten prompts already cover the largest canvases, batches and every method).

Sizes are tiny (64-192 px, 2-3 steps, local fixture model) so the soak fits in a few minutes on
two CPU cores.
"""
import os
import random
import time

import pytest
import torch

pytestmark = pytest.mark.slow

N_PROMPTS = 100
CHUNK = 10
N_REPEATS = 15
PROMPT_TIMEOUT = 300

METHODS = ["MultiDiffusion", "Mixture of Diffusers", "SpotDiffusion"]
MODES = ["schedule", "scale", "off"]
SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "heun", "ddim", "lms"]
SCHEDULERS = ["normal", "karras", "simple", "sgm_uniform"]
SIZES = [(64, 64), (128, 64), (64, 128), (128, 128), (136, 128), (192, 128)]
SHIFTS = ["random", "sorted", "fibonacci"]




import qtd_reliability as rl  # registered by conftest.py (tests/reliability.py)


def random_settings(rng: random.Random, i: int) -> dict:
    """tiled_prompt keyword arguments for prompt ``i`` (the first ten cover the extremes)."""
    if i < CHUNK:   # warm-up: every method, both layouts, the largest canvases and batch 2
        method = METHODS[i % 3]
        layout = "quadtree" if i % 2 else "grid"
        w, h = SIZES[-1 - (i % 2)]
        batch = 2 if i % 3 != 1 else 1
        tile_batch_size = [1, 0, 4][i % 3]
        sampler = SAMPLERS[i % len(SAMPLERS)]
    else:
        method = rng.choice(METHODS)
        layout = rng.choice(["grid", "quadtree"])
        w, h = rng.choice(SIZES)
        batch = rng.choice([1, 2])
        tile_batch_size = rng.choice([0, 1, 2, 4, 8])
        sampler = rng.choice(SAMPLERS)
    img2img = layout == "quadtree" or rng.random() < 0.5
    kw = dict(method=method, mode=rng.choice(MODES), layout=layout, batch=batch,
              enable_overlap=rng.random() < 0.8, overlap=rng.choice([0, 8, 16, 32]),
              tile_batch_size=tile_batch_size, tile_width=rng.choice([64, 96]), tile_height=rng.choice([64, 96]),
              sampler=sampler, scheduler=rng.choice(SCHEDULERS), steps=rng.choice([2, 3]),
              cfg=rng.choice([1.0, 4.0, 7.0]), seed=rng.randrange(1 << 20), width=w, height=h,
              text=f"soak {rng.randrange(1000)}", prefix="qtd_soak")
    if img2img:
        kw.update(image=(w, h), denoise=rng.choice([0.5, 0.7, 1.0]),
                  skip_below=rng.choice([0, 0, 40]))
    if layout == "quadtree":
        lo = round(rng.uniform(0.0, 0.6), 2)
        kw.update(content_threshold=round(rng.uniform(5.0, 40.0), 1), min_tile_size=rng.choice([16, 32, 64]),
                  max_tile_size=rng.choice([64, 128]), min_denoise=lo, max_denoise=round(rng.uniform(lo, 1.0), 2))
    if method == "SpotDiffusion" and rng.random() < 0.5:
        kw["spot"] = {"shift_method": rng.choice(SHIFTS), "seed": rng.randrange(100)}
    return kw


def soak_plan(seed: int):
    """(settings per prompt, {repeat index: original index}); repeats are never adjacent to their original."""
    rng = random.Random(seed)
    settings = [random_settings(rng, i) for i in range(N_PROMPTS)]
    repeats = {}
    for i in sorted(rng.sample(range(CHUNK + 2, N_PROMPTS), N_REPEATS)):
        j = rng.randrange(0, i - 1)
        while j in repeats:          # repeat an original, not a repeat
            j = rng.randrange(0, i - 1)
        if i - 1 in repeats and repeats[i - 1] == j:
            continue
        settings[i] = dict(settings[j])
        repeats[i] = j
    return settings, repeats


def test_soak_100_random_prompts(comfy_server):
    srv = comfy_server
    seed = int(os.environ.get("QTD_SOAK_SEED", "6"))
    oi = srv.object_info()
    settings, repeats = soak_plan(seed)
    assert len(repeats) >= 10
    prompts = []
    for kw in settings:
        kw = dict(kw)
        if "image" in kw:
            kw["image"] = rl.ensure_photo(srv, *kw["image"], seed=1)
        prompts.append(rl.tiled_prompt(oi, **kw))
    for i, j in repeats.items():
        assert prompts[i] == prompts[j] and prompts[i] != prompts[i - 1]

    log_start = len(srv.log_text())
    outputs, rss, t0 = [], [], time.monotonic()
    for c in range(0, N_PROMPTS, CHUNK):
        ids = [srv.queue(p) for p in prompts[c:c + CHUNK]]          # ten queued back to back
        for k, pid in enumerate(ids):
            i = c + k
            entry = srv.wait(pid, PROMPT_TIMEOUT)
            status = entry.get("status", {}).get("status_str")
            assert status == "success", (f"prompt {i} (soak seed {seed}) failed: {settings[i]}\n"
                                         f"{rl.status_messages(entry)}\n{srv.log_tail()}")
            assert "ksampler" not in rl.cached_nodes(entry), f"prompt {i} came from ComfyUI's cache"
            out = rl.saved_latent(srv, entry)
            assert torch.isfinite(out).all(), f"prompt {i}: non-finite output ({settings[i]})"
            assert out.shape[0] == settings[i]["batch"], (i, tuple(out.shape))
            outputs.append(out)
        rss.append(rl.rss(srv))
    elapsed = time.monotonic() - t0
    print(f"soak seed {seed}: {N_PROMPTS} prompts in {elapsed:.0f}s; RSS MB per {CHUNK} prompts: "
          + ", ".join(f"{r / 2**20:.0f}" for r in rss))

    for i, j in repeats.items():
        assert torch.equal(outputs[i], outputs[j]), f"prompt {i} repeats prompt {j} but its output differs"
    log = srv.log_text()[log_start:]
    assert "Traceback" not in log and "!!! Exception" not in log, log[-4000:]
    assert srv.alive()
    assert rss[-1] <= 1.10 * rss[0], f"RSS grew from {rss[0] / 2**20:.0f} MB (10 prompts) to {rss[-1] / 2**20:.0f} MB"
