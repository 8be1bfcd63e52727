"""Movies of any length: a chunked DiT rollout in latent space, streamed through the causal stage-1 decoder.

DiT: chunk 0 is a plain sample of the training length ``L`` (same noise draw as a normal sample of that seed);
every next chunk keeps the last ``C`` latent frames it already generated as context and draws ``L - C`` new
ones, the context imposed by replacement at every solver step (:meth:`LatentDiffusion.sample` ``context``), and
with ``context_guidance`` > 0 the new frames pulled toward agreeing with it (reconstruction guidance). The last
chunk takes more context so that every chunk has the training length. No retraining is needed.

Decoder: each window decodes latent frames ``[new_start - D, new_stop)`` (``D`` = ``decode_context``) and keeps
only the clip frames of the new latent frames; causality makes the kept frames depend only on the window. By
default ``D`` is one more than the decoder's measured reach (``CausalAutoencoder.latent_reach``), so the kept
frames are what a decode of the whole movie would give them: with fewer, a window's start (its first latent frame
read as a lone first frame, zero padding before it) shows in the kept frames as a step at every seam.
Its noise comes from a generator seeded by ``(seed, sample, window)``, so movies are reproducible. At any time
one DiT chunk and one decoder window are in memory, whatever the number of frames.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cadiff.data.pipeline import denormalize_latents, latent_stats
from cadiff.errors import ConfigError

DecodeFn = Callable[[Tensor, int], Tensor]  # (latent window [B, z, T_w, H, W], window index) -> clip window


@dataclass(frozen=True)
class LongMoviePlan:
    """How a movie of ``num_frames`` is cut: DiT chunks of ``chunk`` latent frames with ``context`` overlap."""

    num_frames: int
    num_latent: int
    chunk: int
    context: int
    decode_context: int
    temporal_downsample: int
    decoder_reach: int | None = None  # CausalAutoencoder.latent_reach of the decoder (None: not measured/unbounded)


def latent_frames_for(num_frames: int, temporal_downsample: int) -> int:
    """Latent frames ``1 + k`` of a movie of ``1 + k*s_t`` frames; ConfigError naming the nearest valid counts."""
    s_t = temporal_downsample
    if num_frames < 1 or (num_frames - 1) % s_t:
        lower = 1 + max(0, num_frames - 1) // s_t * s_t
        raise ConfigError(f"config key 'num_frames' = {num_frames}: expected 1 + k*{s_t} frames (the stage-1 "
                          f"temporal_downsample is {s_t}); nearest valid: {lower} or {lower + s_t}")
    return 1 + (num_frames - 1) // s_t


def plan_long_movie(num_frames: int, context_frames: int | None, decode_context_frames: int | None, chunk: int,
                    temporal_downsample: int, decoder_reach: int | None = None) -> LongMoviePlan:
    """Check ``num_frames`` and the context sizes against the exports (DiT chunk length, s_t) and plan the rollout.

    ``decode_context_frames`` None: ``decoder_reach + 1`` latent frames (at least the DiT's context), or the DiT's
    context where the reach is unknown or unbounded."""
    num_latent = latent_frames_for(num_frames, temporal_downsample)
    context = chunk // 2 if context_frames is None else int(context_frames)
    if num_latent > chunk and not 1 <= context < chunk:
        raise ConfigError(f"config key 'context_frames' = {context}: expected 1 .. {chunk - 1} (the stage-2 DiT "
                          f"was trained on {chunk} latent frames; each chunk must add new ones)")
    if decode_context_frames is not None:
        decode_context = int(decode_context_frames)
    else:
        decode_context = context if decoder_reach is None else max(context, decoder_reach + 1)
    return LongMoviePlan(num_frames, num_latent, chunk, max(context, 1), max(decode_context, 1), temporal_downsample,
                         decoder_reach)


def chunk_spans(num_latent: int, chunk: int, context: int) -> list[tuple[int, int, int]]:
    """``(start, new_start, stop)`` latent ranges: chunk ``[start, stop)`` has ``chunk`` frames (the first may be
    cut to ``num_latent``), ``[start, new_start)`` its context; the new ranges tile ``[0, num_latent)``."""
    spans = [(0, 0, min(chunk, num_latent))]
    end = spans[0][2]
    while end < num_latent:
        stop = min(end + chunk - context, num_latent)
        spans.append((stop - chunk, end, stop))
        end = stop
    return spans


def guidance(params: dict[str, Any], batch: int) -> dict[str, Any]:
    """``LatentDiffusion.sample`` keywords for the requested conditions of ``params`` (plain values, as sent to Ray
    tasks): ``roi_mask`` on the latent grid repeated ``[B, H, W]``, ``flux`` ``[B]``, ``guidance_scale``, the
    conditions it applies to (``guided``, None: all; ``cadiff.inference.sample.requested_conditions``) and the
    chunks' ``context_guidance``."""
    requested = params.get("conditions") or {}
    conditions = {name: torch.tensor(value, dtype=torch.float32).expand(batch, *np.shape(value)).clone()
                  for name, value in requested.items()}
    return {"conditions": conditions, "guidance_scale": float(params.get("guidance_scale", 1.0)),
            "context_guidance": float(params.get("context_guidance", 0.0)), "guided": params.get("guided")}


def rollout_latents(dit: Any, plan: LongMoviePlan, latent_bchw: tuple[int, int, int, int], sampler: str | None,
                    num_steps: int | None, generator: torch.Generator,
                    guide: dict[str, Any] | None = None) -> Iterator[Tensor]:
    """New latent frames chunk by chunk, ``[B, z, n, H, W]`` (normalized latent units); holds one chunk at a time.

    ``guide``: conditions and guidance scale for every chunk (:func:`guidance`)."""
    b, c, h, w = latent_bchw
    recent: Tensor | None = None  # the previous chunk, latent frames [prev_stop - chunk, prev_stop)
    prev_stop = 0
    for start, new_start, stop in chunk_spans(plan.num_latent, plan.chunk, plan.context):
        context = None if recent is None else recent[:, :, start - (prev_stop - plan.chunk):]
        recent = dit.sample((b, c, plan.chunk, h, w), sampler=sampler, num_steps=num_steps, generator=generator,
                            context=context, **(guide or {}))
        yield recent[:, :, new_start - start : stop - start]
        prev_stop = start + plan.chunk


def decode_stream(decode_fn: DecodeFn, latent_chunks: Iterator[Tensor], decode_context: int,
                  temporal_downsample: int) -> Iterator[Tensor]:
    """Clip frames of each latent chunk, decoded with up to ``decode_context`` earlier latent frames as left context.

    The first window starts at latent frame 0 (decoded alone, the image prior) and keeps every frame; later
    windows keep the ``n * s_t`` frames of their ``n`` new latent frames. ``decode_fn`` never receives more than
    ``decode_context`` + one chunk of latent frames.
    """
    history: Tensor | None = None
    for index, new in enumerate(latent_chunks):
        window = new if history is None else torch.cat([history, new], dim=2)
        clip = decode_fn(window, index)
        yield clip if history is None else clip[:, :, clip.shape[2] - new.shape[2] * temporal_downsample:]
        history = window[:, :, -decode_context:]


def window_generator(seed: int, sample_index: int, window: int) -> torch.Generator:
    """The decoder's generator for one window: a pure function of ``(seed, sample, window)``."""
    state = np.random.SeedSequence([int(seed), int(sample_index), int(window)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def stream_movie(dit: Any, decode: Callable[[Tensor, torch.Generator], Tensor], stats: tuple[Tensor, Tensor],
                 plan: LongMoviePlan, latent_bchw: tuple[int, int, int, int], sampler: str | None,
                 num_steps: int | None, generator: torch.Generator, window_seed: tuple[int, int],
                 guide: dict[str, Any] | None = None) -> Iterator[Tensor]:
    """Clip frames of a movie chunk after chunk: the DiT rollout (:func:`rollout_latents`) de-normalised by
    ``stats`` (per-channel latent mean, std) and streamed through ``decode(latent window, generator)``
    (:func:`decode_stream`), window ``k`` decoded with :func:`window_generator` ``(*window_seed, k)``."""
    def window(z: Tensor, index: int) -> Tensor:
        return decode(denormalize_latents(z, stats), window_generator(*window_seed, index))

    latents = rollout_latents(dit, plan, latent_bchw, sampler, num_steps, generator, guide)
    with torch.no_grad():
        yield from decode_stream(window, latents, plan.decode_context, plan.temporal_downsample)


def stream_sample(dit: Any, decoder: Any, data2: dict[str, Any], plan: LongMoviePlan, params: dict[str, Any],
                  index: int) -> Iterator[Tensor]:
    """Normalized clip frames ``[1, C, n, H, W]`` of generated sample ``index``, chunk after chunk."""
    seed = int(params["seed"])
    c, _, h, w = data2["sample_shape"]
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)  # a normal sample's draw (batch_size=1)
    stats = latent_stats(data2)

    def decode(z: Tensor, window_gen: torch.Generator) -> Tensor:
        return decoder.decode(z, sampler=params["decoder_sampler"], num_steps=params["decoder_steps"],
                              generator=window_gen, grid=params["decoder_grid"])

    yield from stream_movie(dit, decode, stats, plan, (1, c, h, w), params["latent_sampler"], params["latent_steps"],
                            generator, (seed, index), guidance(params, 1))
