"""`vramancer run --temperature T --top-p P --seed S` samples with runtime/sampling.py's Sampler, the one
serve and run --cluster use: a split model's generate draws exactly the tokens a plain loop over its
logits draws with a Sampler of the same parameters and seed (no hidden top-k of 50 from the generation
config, no global RNG), the same seed gives the same tokens, and another seed other tokens."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from .conftest import make_plan  # noqa: E402

PROMPT = torch.tensor([[3, 14, 15, 92, 65]])
NEW = 12


def _split(saved_models):
    from vramancer.runtime.loader import load

    folder = saved_models["llama"]
    return load(str(folder), plan=make_plan(str(folder), 2))


def _loop(model, temperature, top_p, seed) -> list[int]:
    """Prefill, then one token at a time with the cache, each drawn by a Sampler from the last logits."""
    from vramancer.runtime.sampling import Sampler, SamplingParams

    sampler = Sampler(SamplingParams(temperature=temperature, top_p=top_p, seed=seed))
    out = []
    with torch.no_grad():
        step = model(input_ids=PROMPT, attention_mask=torch.ones_like(PROMPT), use_cache=True)
        cache, mask = step.past_key_values, torch.ones_like(PROMPT)
        for _ in range(NEW):
            tok = sampler.sample(step.logits[0, -1].float())
            out.append(tok)
            mask = torch.cat([mask, torch.ones((1, 1), dtype=mask.dtype)], dim=1)
            step = model(input_ids=torch.tensor([[tok]]), attention_mask=mask, cache=cache, use_cache=True)
            cache = step.past_key_values
    return out


def _generate(model, temperature, top_p, seed) -> list[int]:
    from vramancer.runtime.generate import generate_ids

    out = generate_ids(model, {"input_ids": PROMPT, "attention_mask": torch.ones_like(PROMPT)}, NEW, temperature,
                       top_p=top_p, seed=seed, min_new_tokens=NEW)
    return out[0, PROMPT.shape[1]:].tolist()


def test_run_samples_with_the_sampler(saved_models):
    model = _split(saved_models)
    model.generation_config.top_k = 50          # what a published generation_config.json often says
    drawn = _generate(model, 1.5, 0.95, 7)
    assert drawn == _loop(model, 1.5, 0.95, 7)
    assert drawn == _generate(model, 1.5, 0.95, 7)
    assert drawn != _generate(model, 1.5, 0.95, 8)
    greedy = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=NEW,
                            min_new_tokens=NEW, do_sample=False)[0, PROMPT.shape[1]:].tolist()
    assert drawn != greedy
    model.vramancer.detach()
