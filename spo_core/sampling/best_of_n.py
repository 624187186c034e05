"""Best-of-N: N independent full samples per prompt, the final images scored, the best kept.

The baseline for the per-step resampler, with the same inputs and result type. All N*B rows
run as one batch (k-major like the resampler's pools).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigError
from ..progress import CancelFn, ProgressFn
from .denoiser import Conditioning, CountingDenoiser, Decoder, Denoiser, repeat_cond
from .resampler import ResampleResult, StepRecord, _check_scorer, _scores, is_latent_scorer
from .samplers import StepCallback, sample_ancestral
from .schedule import NoiseSchedule, check_sigmas


@torch.no_grad()
def best_of_n(
    denoiser: Denoiser,
    cond: Conditioning,
    x_starts: torch.Tensor,
    sigmas: torch.Tensor,
    schedule: NoiseSchedule,
    scorer,
    decode: Decoder,
    prompts: Sequence[str] | str | None,
    n: int,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    callback: StepCallback | None = None,
    cancel: CancelFn | None = None,
    progress: ProgressFn | None = None,
) -> ResampleResult:
    """`x_starts`: [n*B, ...] starting points in sigma space (row j*B + b is sample j of prompt b).

    Returns the best sample per prompt ([B, ...] at sigmas[-1]) and one trace record holding
    the n x B final scores and the chosen index; evaluations are n * B * steps rows.
    """
    if n < 1:
        raise ConfigError(f"n must be at least 1, got {n}")
    b = cond.batch_size
    if x_starts.shape[0] != n * b:
        raise ConfigError(f"x_starts has {x_starts.shape[0]} rows; expected n * batch = {n * b}")
    sig = check_sigmas(sigmas)
    prompt_list = _check_scorer(scorer, prompts, b)
    counter = denoiser if isinstance(denoiser, CountingDenoiser) else CountingDenoiser(denoiser)
    start_rows, start_calls = counter.rows, counter.calls
    out = sample_ancestral(counter, repeat_cond(cond, n), x_starts, sig, eta=eta, generator=generator, seed=seed,
                           schedule=schedule, callback=callback, cancel=cancel, progress=progress)
    final_sigma = float(sig[-1])
    final = schedule.model_latent(out.x, final_sigma)
    if is_latent_scorer(scorer):  # the final latents, at the timestep of the last step (LPO's convention)
        images, t_scored, decoded = final, round(float(schedule.timestep(float(sig[-2]))), 4), 0
    else:
        if decode is None:
            raise ConfigError("best-of-N needs a decoder (latents -> images) for a pixel scorer")
        images, t_scored, decoded = decode(final), 0.0, n * b
    prompts_n = [prompt_list[r % b] for r in range(n * b)] if prompt_list is not None else None
    scores = _scores(scorer, images, prompts_n, torch.full((n * b,), t_scored), n, b)
    chosen = scores.argmax(0)
    x = out.x.reshape(n, b, *out.x.shape[1:])[chosen, torch.arange(b)]
    record = StepRecord(len(sig) - 2, float(sig[-2]), final_sigma, 0.0, pooled=True, t_scored=t_scored,
                        scores=scores, chosen=chosen, steps=len(sig) - 1, evaluations=out.evaluations,
                        decodes=decoded, scorer_rows=n * b)
    return ResampleResult(x, counter.rows - start_rows, counter.calls - start_calls, len(sig) - 1, [record])
