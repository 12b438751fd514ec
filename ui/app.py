"""The Gradio Blocks of ParaStep Studio. Talks only to a backend object (launcher.backend).

Every action has a named endpoint: ``/generate`` and ``/compare`` take the same inputs and
return the same ten outputs (see README, "API"); ``/status`` describes the ranks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any, Protocol

import gradio as gr

from launcher.protocol import (
    METHOD_LABELS,
    CompareOutput,
    GenerateRequest,
    InputError,
    ModelInfo,
    Progress,
    RunError,
    RunOutput,
)
from ui import media, panel

log = logging.getLogger(__name__)

CSS = """
.crisp img { image-rendering: pixelated; }
#latency-panel table { font-variant-numeric: tabular-nums; }
"""

EXAMPLE_PROMPTS = [
    "a red fox in fresh snow, golden hour",
    "a lighthouse on a cliff under a starry sky",
    "ocean waves rolling onto a pebble beach",
]


class BackendLike(Protocol):
    def model_infos(self) -> dict[str, ModelInfo]: ...
    def submit(self, req: GenerateRequest, compare: bool = False) -> Any: ...
    def status(self) -> dict[str, Any]: ...


def _side(label: str, info: ModelInfo | None) -> tuple[gr.Image, gr.Video, gr.Audio]:
    modality = info.modality if info else "image"
    image = gr.Image(label=label, type="numpy", format="png", interactive=False, elem_classes="crisp",
                     visible=modality == "image")  # fmt: skip
    video = gr.Video(label=label, format="mp4", interactive=False, visible=modality == "video", autoplay=True,
                     loop=True)  # fmt: skip
    audio = gr.Audio(label=label, type="filepath", interactive=False, visible=modality == "audio")
    return image, video, audio


def _media_values(run: RunOutput | None) -> list[Any]:
    """Plain values for one side's (image, video, audio): only the run's modality is set."""
    values: list[Any] = [None, None, None]
    if run is not None:
        if run.modality == "image":
            values[0] = media.display_image(run.media)
        elif run.modality == "video":
            values[1] = media.write_video(run.media, fps=run.fps)
        else:
            values[2] = media.write_audio(run.media, run.sample_rate or 16000)
    return values


def _examples(info: ModelInfo | None) -> list[list[str]]:
    return [[p] for p in (info.examples if info and info.examples else EXAMPLE_PROMPTS)]


def _vocabulary(info: ModelInfo | None) -> str:
    return f"<small>This model knows: {info.vocabulary}</small>" if info and info.vocabulary else ""


def _shown(modality: str | None) -> list[Any]:
    """Visibility updates for one side's (image, video, audio)."""
    return [gr.update(visible=modality == kind) for kind in ("image", "video", "audio")]


def build_demo(backend: BackendLike, title: str = "ParaStep Studio") -> gr.Blocks:
    infos = backend.model_infos()
    names = list(infos)
    first = infos[names[0]] if names else None
    status = backend.status()
    ranks = status["world_size"]

    with gr.Blocks(title=title) as demo:
        gr.Markdown(
            f"# {title}\n"
            f"Step-parallel diffusion: **ParaStep** spreads denoising steps over ranks, **BatchStep** batches "
            f"look-ahead steps on one device, against the **baseline**. Running on **{ranks} rank(s)** "
            f"({status['backend']}, {status['device']})."
        )
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                model = gr.Dropdown(names, value=names[0] if names else None, label="Model")
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="What should it generate?",
                                    elem_id="prompt")  # fmt: skip
                vocabulary = gr.Markdown(_vocabulary(first), elem_id="vocabulary")
                negative = gr.Textbox(label="Negative prompt", lines=1)
                method = gr.Radio(
                    [(label, key) for key, label in METHOD_LABELS.items()], value="parastep", label="Method"
                )
                with gr.Row():
                    warmup = gr.Number(2, label="Warm-up steps", precision=0, info="run normally before reusing")
                    stride = gr.Number(2, label="Stride (BatchStep)", precision=0, info="steps per batched call")
                with gr.Row():
                    steps = gr.Number(first.default_steps if first else 10, label="Steps", precision=0, elem_id="steps")
                    guidance = gr.Number(first.default_guidance if first else 3.0, label="Guidance")
                    seed = gr.Number(0, label="Seed", precision=0)
                with gr.Row():
                    fixed = first is not None and first.fixed_size
                    height = gr.Number(first.default_height if first else None, label="Height", precision=0,
                                       interactive=not fixed,
                                       visible=first is not None and first.modality != "audio")  # fmt: skip
                    width = gr.Number(first.default_width if first else None, label="Width", precision=0,
                                      interactive=not fixed,
                                      visible=first is not None and first.modality != "audio")  # fmt: skip
                    frames = gr.Number(first.default_frames if first else None, label="Frames", precision=0,
                                       interactive=not fixed,
                                       visible=first is not None and first.modality == "video")  # fmt: skip
                    duration = gr.Number(first.default_duration_s if first else None, label="Duration (s)",
                                         interactive=not fixed,
                                         visible=first is not None and first.modality == "audio")  # fmt: skip
                with gr.Row():
                    generate_btn = gr.Button("Generate", elem_id="generate-btn")
                    compare_btn = gr.Button("Compare with baseline", variant="primary", elem_id="compare-btn")
                examples = gr.Dataset(components=[prompt], samples=_examples(first), label="Example prompts",
                                      type="values")  # fmt: skip
            with gr.Column(scale=3, min_width=400):
                run_status = gr.Markdown("Pick a model, type a prompt, and press **Compare with baseline**.",
                                         elem_id="run-status", min_height=56, padding=True)  # fmt: skip
                preview = gr.Image(label="Live preview (streamed while denoising)", type="numpy", interactive=False,
                                   elem_classes="crisp", elem_id="preview", height=200)  # fmt: skip
                with gr.Row():
                    with gr.Column(elem_id="left-output"):
                        left_title = gr.Markdown("**Result**")
                        left = _side("Output", first)
                    with gr.Column(elem_id="right-output", visible=False) as right_col:
                        right_title = gr.Markdown("**Accelerated**")
                        right = _side("Output", first)
                latency = gr.Markdown(elem_id="latency-panel")
                plot = gr.Plot(label="Per-rank timeline", elem_id="timeline")
                with gr.Accordion("Raw numbers", open=False):
                    details = gr.JSON(label="Latency panel (JSON)")
                with gr.Accordion("Ranks", open=False):
                    cluster = gr.JSON(value=status, label="Ranks")
                    refresh = gr.Button("Refresh", size="sm")

        inputs = [model, prompt, negative, method, warmup, stride, steps, guidance, seed, height, width, frames,
                  duration]  # fmt: skip
        outputs = [preview, *left, *right, latency, plot, details, run_status]

        def on_model(name: str) -> list[Any]:
            info = infos.get(name)
            if info is None:
                return [gr.update()] * 14
            spatial = info.modality in ("image", "video")
            return [
                *_shown(info.modality),
                *_shown(info.modality),
                gr.update(visible=spatial, value=info.default_height, interactive=not info.fixed_size),
                gr.update(visible=spatial, value=info.default_width, interactive=not info.fixed_size),
                gr.update(visible=info.modality == "video", value=info.default_frames, interactive=not info.fixed_size),
                gr.update(visible=info.modality == "audio", value=info.default_duration_s,
                          interactive=not info.fixed_size),  # fmt: skip
                gr.update(value=info.default_steps),
                gr.update(value=info.default_guidance),
                gr.Dataset(samples=_examples(info)),
                _vocabulary(info),
            ]

        model.change(on_model, [model], [*left, *right, height, width, frames, duration, steps, guidance, examples, vocabulary],
                     api_visibility="private")  # fmt: skip

        def run(compare: bool, values: tuple[Any, ...], progress: gr.Progress) -> Iterator[Any]:
            req = _request(values)
            try:
                job = backend.submit(req, compare=compare)
            except InputError as exc:
                raise gr.Error(str(exc), title="Please change the input", print_exception=False) from None
            except RunError as exc:
                raise gr.Error(str(exc), title="Could not run", print_exception=False) from None
            for note in job.warnings:
                gr.Warning(note)
            try:
                last_preview = None
                for event in job.stream():
                    if isinstance(event, Progress):
                        done = event.step / max(1, event.total)
                        desc = f"{event.label}: step {event.step}/{event.total}" if event.step else event.label
                        progress(done, desc=desc)
                        if event.preview is not None:
                            last_preview = media.preview_image(event.preview)
                            yield {preview: last_preview}
                    elif isinstance(event, CompareOutput):
                        done = (f"**Done**: baseline {event.baseline.wall_s:.2f} s, "
                                f"{METHOD_LABELS[event.method.method]} {event.method.wall_s:.2f} s "
                                f"({event.speedup:.2f}× whole call"
                                + (f", {event.speedup_denoise:.2f}× denoising" if event.speedup_denoise else "")
                                + ").")  # fmt: skip
                        yield [last_preview, *_media_values(event.baseline), *_media_values(event.method),
                               panel.compare_markdown(event), panel.timeline([event.baseline, event.method]),
                               panel.compare_numbers(event), done]  # fmt: skip
                    elif isinstance(event, RunOutput):
                        done = f"**Done**: {METHOD_LABELS[event.method]} in {event.wall_s:.2f} s."
                        yield [last_preview, *_media_values(event), *_media_values(None), panel.run_markdown(event),
                               panel.timeline([event]), panel.run_numbers(event), done]  # fmt: skip
            except InputError as exc:
                raise gr.Error(str(exc), title="Please change the input", print_exception=False) from None
            except RunError as exc:
                raise gr.Error(str(exc), title="Could not run", print_exception=False) from None
            finally:
                job.cancel()  # no-op when finished; otherwise the browser left: drop the result

        def generate(*values: Any, progress: gr.Progress = gr.Progress()) -> Iterator[Any]:
            """Run one generation with the chosen method."""
            yield from run(False, values, progress)

        def compare(*values: Any, progress: gr.Progress = gr.Progress()) -> Iterator[Any]:
            """Run the baseline and the chosen method on the same seed; latency and quality side by side."""
            yield from run(True, values, progress)

        def layout(compare: bool, method_key: str) -> list[Any]:
            method_label = METHOD_LABELS.get(method_key, "Accelerated")
            return [f"**{'Baseline' if compare else method_label}**", gr.update(visible=compare), f"**{method_label}**"]

        examples.click(lambda sample: sample[0], [examples], [prompt], api_visibility="private")

        # The layout step is UI-only; /generate and /compare return plain values for API clients.
        for trigger, fn, name in ((generate_btn.click, generate, "generate"), (compare_btn.click, compare, "compare")):
            is_compare = name == "compare"
            trigger(lambda m, c=is_compare: layout(c, m), [method], [left_title, right_col, right_title],
                    api_visibility="private", queue=False).then(
                fn, inputs, outputs, api_name=name, concurrency_limit=8, concurrency_id="runs",
                show_progress_on=[run_status])  # fmt: skip
        refresh.click(backend.status, None, cluster, api_name="status")
    return demo


def _request(values: tuple[Any, ...]) -> GenerateRequest:
    (model, prompt, negative, method, warmup, stride, steps, guidance, seed, height, width, frames,
     duration) = values  # fmt: skip

    def number(x: Any) -> Any:
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else x

    return GenerateRequest(
        model=str(model or ""),
        prompt=str(prompt or ""),
        negative_prompt=str(negative or ""),
        method=str(method or ""),
        steps=number(steps),
        warmup_steps=number(warmup),
        stride=number(stride),
        guidance_scale=number(guidance),
        seed=number(seed),
        height=number(height),
        width=number(width),
        num_frames=number(frames),
        duration_s=number(duration),
    )
