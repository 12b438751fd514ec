"""The Gradio Blocks of ParaStep Studio. Talks only to a backend object (launcher.backend).

Every action has a named endpoint with named parameters: ``/generate`` and ``/compare`` take
the fields of :class:`~launcher.request.GenerateRequest` (only ``prompt`` matters to start;
every other parameter has a default, ``None`` meaning the model's own) and return the
:data:`OUTPUTS` in order; ``/status`` describes the ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Protocol

import gradio as gr

from launcher.methods import METHOD_INFO
from launcher.protocol import CompareOutput, Progress, RaceOutput, RunError, RunOutput
from launcher.request import METHOD_LABELS, GenerateRequest, InputError, ModelInfo
from ui import media, panel, share

log = logging.getLogger(__name__)

CSS = """
.crisp img { image-rendering: pixelated; }
#latency-panel table, #race-table table { font-variant-numeric: tabular-nums; }
/* Gradio's Markdown breaks words anywhere ("Ide / al"): break at spaces, scroll if it must */
#race-table table, #race-table th, #race-table td { word-break: normal; overflow-wrap: normal; }
#race-table { overflow-x: auto; }
"""

# The outputs of /generate and /compare, in order (the README's API table names them too).
OUTPUTS = (
    "preview",
    "left_image",
    "left_video",
    "left_audio",
    "right_image",
    "right_video",
    "right_audio",
    "latency_panel",
    "timeline",
    "numbers",
    "status",
)

RACE_SLOTS = 5  # one per method at most
# The outputs of /race, in order: a gallery (images or videos; audio: waveforms), one audio
# player per method, the table, the per-rank timelines, numbers and status. /share then exports
# the session's last race as one file.
RACE_OUTPUTS = (
    "race_gallery",
    *(f"race_audio_{i + 1}" for i in range(RACE_SLOTS)),
    "race_table",
    "race_timeline",
    "race_numbers",
    "race_status",
)


class _Blocks(gr.Blocks):
    """Blocks that refuse a call with more inputs than the endpoint takes (Gradio drops them)."""

    def validate_inputs(self, block_fn: Any, inputs: list[Any]) -> None:
        super().validate_inputs(block_fn, inputs)
        if len(inputs) > len(block_fn.inputs):
            raise gr.Error(
                f"/{block_fn.api_name or block_fn.name} takes {len(block_fn.inputs)} inputs, got {len(inputs)}: "
                "remove the extra ones (see the API page for the parameters by name).",
                title="Please change the input",
                print_exception=False,
            )


class BackendLike(Protocol):
    def model_infos(self) -> dict[str, ModelInfo]: ...
    def submit(self, req: GenerateRequest, compare: bool = False) -> Any: ...
    def submit_race(self, req: GenerateRequest, methods: Any) -> Any: ...
    def status(self) -> dict[str, Any]: ...


def _side(label: str, info: ModelInfo | None) -> tuple[gr.Image, gr.Video, gr.Audio]:
    modality = info.modality if info else "image"
    image = gr.Image(
        label=label,
        type="numpy",
        format="png",
        interactive=False,
        elem_classes="crisp",
        visible=modality == "image",
    )
    video = gr.Video(
        label=label, format="mp4", interactive=False, visible=modality == "video", autoplay=True, loop=True
    )
    audio = gr.Audio(label=label, type="filepath", interactive=False, visible=modality == "audio")
    return image, video, audio


def _media_values(run: RunOutput | None) -> list[Any]:
    """Plain values for one side's (image, video, audio): only the run's modality is set."""
    values: list[Any] = [None, None, None]
    if run is not None:
        if run.modality == "image":
            values[0] = media.write_image(run.media)
        elif run.modality == "video":
            values[1] = media.write_video(run.media, fps=run.fps)
        else:
            values[2] = media.write_audio(run.media, run.sample_rate or 16000)
    return values


def _model_fields(info: ModelInfo) -> dict[str, dict[str, Any]]:
    """Per model-dependent field: shown or not, editable or not, and the model's default."""
    spatial, editable = info.modality in ("image", "video"), not info.fixed_size
    return {
        "steps": {"value": info.default_steps},
        "guidance": {"value": info.default_guidance},
        "height": {"visible": spatial, "interactive": editable, "value": info.default_height},
        "width": {"visible": spatial, "interactive": editable, "value": info.default_width},
        "frames": {"visible": info.modality == "video", "interactive": editable, "value": info.default_frames},
        "duration": {"visible": info.modality == "audio", "interactive": editable, "value": info.default_duration_s},
        "sparsetem": {"visible": bool(info.sparsetem_parts), "value": False},
    }


def _vocabulary(info: ModelInfo | None) -> str:
    return f"<small>This model knows: {info.vocabulary}</small>" if info and info.vocabulary else ""


def _examples(info: ModelInfo | None) -> list[list[str]]:
    return [[p] for p in info.examples] if info and info.examples else [["a red fox in fresh snow, golden hour"]]


def _race_values(result: RaceOutput, warnings: list[str]) -> list[Any]:
    """The /race outputs in order (:data:`RACE_OUTPUTS`), and the race for Share."""
    runs = result.runs
    audio: list[Any] = [gr.update(value=None, visible=False) for _ in range(RACE_SLOTS)]
    gallery: list[tuple[Any, str]] = []
    for i, run in enumerate(runs):
        caption = f"{run.label} · {run.wall_s:.2f} s"
        if run.modality == "image":
            gallery.append((media.write_image(run.media), caption))
        elif run.modality == "video":
            gallery.append((media.write_video(run.media, fps=run.fps), caption))
        else:
            gallery.append((media.write_preview(run.media), caption))
            path = media.write_audio(run.media, run.sample_rate or 16000)
            audio[i] = gr.update(value=path, visible=True, label=caption)
    fastest = min(result.results, key=lambda r: r.method.wall_s, default=None)
    done = f"**Done**: {len(runs)} method(s)" + (
        f"; fastest {fastest.method.label} at {fastest.speedup:.2f}× the baseline." if fastest else "."
    )
    numbers = panel.race_numbers(result) | {"warnings": warnings}
    timeline = panel.timeline(runs, labels=[r.label for r in runs])
    return [gallery, *audio, panel.race_markdown(result, METHOD_INFO), timeline, numbers, done, result]


def _share_entries(result: RaceOutput) -> list[share.ShareEntry]:
    by_run = {id(r.method): r for r in result.results}
    entries = []
    for run in result.runs:
        r = by_run.get(id(run))
        note = f"{r.speedup:.2f}× · {panel.psnr_text(r.psnr)}" if r else "reference"
        entries.append(share.ShareEntry(run.label, run.wall_s, run.media, note))
    return entries


def _error(exc: Exception) -> gr.Error:
    title = "Please change the input" if isinstance(exc, InputError) else "Could not run"
    return gr.Error(str(exc), title=title, print_exception=False)


def build_demo(backend: BackendLike, title: str = "ParaStep Studio") -> gr.Blocks:
    infos = backend.model_infos()
    names = list(infos)
    first = infos[names[0]] if names else None
    status = backend.status()

    with _Blocks(title=title) as demo:
        gr.Markdown(
            f"# {title}\n"
            f"Step-parallel diffusion: **ParaStep** spreads denoising steps over ranks, **BatchStep** batches "
            f"look-ahead steps on one device, against the **baseline** and the contestants **AsyncDiff** and "
            f"**CFG-parallel** (the **Race** tab runs any of them side by side). Running on "
            f"**{status['world_size']} rank(s)** ({status['backend']}, {status['device']})."
        )
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                model = gr.Dropdown(names, value=names[0] if names else None, label="Model")
                prompt = gr.Textbox(
                    value=first.examples[0] if first and first.examples else "",
                    label="Prompt",
                    lines=2,
                    placeholder="What should it generate?",
                    elem_id="prompt",
                )
                vocabulary = gr.Markdown(_vocabulary(first), elem_id="vocabulary")
                negative = gr.Textbox("", label="Negative prompt", lines=1)
                method = gr.Radio(
                    [(label, key) for key, label in METHOD_LABELS.items()], value="parastep", label="Method"
                )
                with gr.Row():
                    warmup = gr.Number(2, label="Warm-up steps", info="run normally before reusing")
                    stride = gr.Number(2, label="Stride (BatchStep)", info="steps per batched call")
                # Built empty, so that an API call leaving them out gets its model's defaults (None);
                # the page shows the model's defaults once it loads (on_model).
                with gr.Row():
                    steps = gr.Number(None, label="Steps", elem_id="steps")
                    guidance = gr.Number(None, label="Guidance", elem_id="guidance")
                    seed = gr.Number(0, label="Seed")
                with gr.Row():
                    height = gr.Number(None, label="Height")
                    width = gr.Number(None, label="Width")
                    frames = gr.Number(None, label="Frames")
                    duration = gr.Number(None, label="Duration (s)")
                sparsetem = gr.Checkbox(
                    False,
                    label="SparseTem: compute each frame only where it changed (video)",
                    info="with Baseline it runs alone against the dense baseline; it combines with ParaStep/BatchStep",
                    visible=bool(first and first.sparsetem_parts),
                    elem_id="sparsetem",
                )
                with gr.Row():
                    generate_btn = gr.Button("Generate", elem_id="generate-btn")
                    compare_btn = gr.Button("Compare with baseline", variant="primary", elem_id="compare-btn")
                examples = gr.Dataset(
                    components=[prompt],
                    samples=_examples(first),
                    label="Example prompts",
                    type="values",
                    elem_id="examples",
                )
            with gr.Column(scale=3, min_width=400), gr.Tabs():
                with gr.Tab("Compare", id="compare-tab"):
                    run_status = gr.Markdown(
                        "Pick a model and press **Compare with baseline**.",
                        label="Status",
                        elem_id="run-status",
                        min_height=56,
                        padding=True,
                    )
                    preview = gr.Image(
                        label="Live preview (streamed while denoising)",
                        type="numpy",
                        interactive=False,
                        elem_classes="crisp",
                        elem_id="preview",
                        height=200,
                    )
                    with gr.Row():
                        with gr.Column(elem_id="left-output"):
                            left_title = gr.Markdown("**Result**")
                            left = _side("Result (the baseline in Compare)", first)
                        with gr.Column(elem_id="right-output", visible=False) as right_col:
                            right_title = gr.Markdown("**Accelerated**")
                            right = _side("Accelerated (Compare only)", first)
                    latency = gr.Markdown(label="Latency panel", elem_id="latency-panel")
                    plot = gr.Plot(label="Per-rank timeline", elem_id="timeline")
                    with gr.Accordion("Raw numbers", open=False):
                        details = gr.JSON(label="Numbers (JSON)")
                with gr.Tab("Race", id="race-tab"):
                    with gr.Row():
                        race_methods = gr.CheckboxGroup(
                            [(label, key) for key, label in METHOD_LABELS.items()],
                            value=["baseline", "parastep", "batchstep"],
                            label="Methods (same prompt and seed, one after another)",
                            elem_id="race-methods",
                        )
                        race_btn = gr.Button("Race", variant="primary", elem_id="race-btn", scale=0)
                    race_status = gr.Markdown("Pick methods and press **Race**.", elem_id="race-status", padding=True)
                    race_gallery = gr.Gallery(
                        label="Side by side",
                        columns=RACE_SLOTS,
                        height="auto",
                        elem_id="race-gallery",
                        object_fit="contain",
                    )
                    race_audio = [
                        gr.Audio(type="filepath", interactive=False, visible=False, elem_id=f"race-audio-{i + 1}")
                        for i in range(RACE_SLOTS)
                    ]
                    race_table = gr.Markdown(elem_id="race-table")
                    race_plot = gr.Plot(label="Per-rank timeline per method", elem_id="race-timeline")
                    with gr.Row():
                        share_btn = gr.Button("Share: export the race as one file", elem_id="share-btn", size="sm")
                        race_share = gr.File(label="Side-by-side file", elem_id="race-share", interactive=False)
                    with gr.Accordion("Raw numbers", open=False):
                        race_details = gr.JSON(label="Numbers (JSON)")
                    last_race = gr.State(None)
        with gr.Accordion("Ranks", open=False):
            cluster = gr.JSON(value=status, label="Ranks")
            refresh = gr.Button("Refresh", size="sm")

        inputs = [
            prompt,
            model,
            negative,
            method,
            warmup,
            stride,
            steps,
            guidance,
            seed,
            height,
            width,
            frames,
            duration,
            sparsetem,
        ]
        outputs = [preview, *left, *right, latency, plot, details, run_status]
        assert len(outputs) == len(OUTPUTS)

        def on_model(name: str) -> dict[Any, Any]:
            """Shows the chosen model's fields, its defaults as hints and its first example prompt."""
            info = infos.get(name)
            if info is None:
                return {}
            updates: dict[Any, Any] = {
                component: gr.update(visible=info.modality == kind)
                for side in (left, right)
                for component, kind in zip(side, ("image", "video", "audio"))
            }
            field_components: dict[str, Any] = {"steps": steps, "guidance": guidance, "height": height, "width": width}
            field_components |= {"frames": frames, "duration": duration, "sparsetem": sparsetem}
            for key, props in _model_fields(info).items():
                updates[field_components[key]] = gr.update(**props)
            updates[prompt] = gr.update(value=info.examples[0] if info.examples else "")
            updates[examples] = gr.Dataset(samples=_examples(info))
            updates[vocabulary] = _vocabulary(info)
            return updates

        model_fields = [*left, *right, prompt, height, width, frames, duration, steps, guidance, examples, vocabulary]
        model_fields += [sparsetem]
        model.change(on_model, [model], model_fields, api_visibility="private")
        demo.load(on_model, [model], model_fields, api_visibility="private", queue=False)

        def run(compare: bool, req: GenerateRequest, progress: gr.Progress) -> Iterator[dict[Any, Any]]:
            try:
                job = backend.submit(req, compare=compare)
            except (InputError, RunError) as exc:
                raise _error(exc) from None
            for note in job.warnings:
                gr.Warning(note)
            try:
                last_preview = None
                for event in job.stream():
                    if isinstance(event, Progress):
                        desc = f"{event.label}: step {event.step}/{event.total}" if event.step else event.label
                        progress(event.step / max(1, event.total), desc=desc)
                        if event.preview is not None:
                            last_preview = media.write_preview(event.preview)
                            yield {preview: last_preview}
                    elif isinstance(event, CompareOutput):
                        done = (
                            f"**Done**: baseline {event.baseline.wall_s:.2f} s, "
                            f"{METHOD_LABELS[event.method.method]} {event.method.wall_s:.2f} s "
                            f"({event.speedup:.2f}× whole call"
                            + (f", {event.speedup_denoise:.2f}× denoising" if event.speedup_denoise else "")
                            + ")."
                        )
                        numbers = panel.compare_numbers(event) | {"warnings": job.warnings}
                        values = [last_preview, *_media_values(event.baseline), *_media_values(event.method)]
                        values += [panel.compare_markdown(event), panel.timeline([event.baseline, event.method])]
                        yield dict(zip(outputs, [*values, numbers, done]))
                    elif isinstance(event, RunOutput):
                        done = f"**Done**: {METHOD_LABELS[event.method]} in {event.wall_s:.2f} s."
                        numbers = panel.run_numbers(event) | {"warnings": job.warnings}
                        values = [last_preview, *_media_values(event), *_media_values(None)]
                        values += [panel.run_markdown(event), panel.timeline([event])]
                        yield dict(zip(outputs, [*values, numbers, done]))
            except (InputError, RunError) as exc:
                raise _error(exc) from None
            finally:
                job.cancel()  # no-op when finished; otherwise the browser left: drop the result

        def endpoint(compare: bool) -> Any:
            def fn(
                prompt: str,
                model: str = names[0] if names else "",
                negative_prompt: str = "",
                method: str = "parastep",
                warmup_steps: int = 2,
                stride: int = 2,
                steps: int | None = None,
                guidance_scale: float | None = None,
                seed: int = 0,
                height: int | None = None,
                width: int | None = None,
                num_frames: int | None = None,
                duration_s: float | None = None,
                sparsetem: bool = False,
                progress: gr.Progress = gr.Progress(),  # noqa: B008 - how Gradio injects progress
            ) -> Iterator[dict[Any, Any]]:
                req = GenerateRequest(
                    prompt=prompt,
                    model=model,
                    negative_prompt=negative_prompt,
                    method=method,
                    warmup_steps=warmup_steps,
                    stride=stride,
                    steps=steps,
                    guidance_scale=guidance_scale,
                    seed=seed,
                    height=height,
                    width=width,
                    num_frames=num_frames,
                    duration_s=duration_s,
                    sparsetem=sparsetem,
                )
                yield from run(compare, req, progress)

            fn.__name__ = "compare" if compare else "generate"
            fn.__doc__ = (
                "Run the baseline and the chosen method on the same seed; latency and quality side by side."
                if compare
                else "Run one generation with the chosen method."
            )
            return fn

        def layout(compare: bool, method_key: str) -> list[Any]:
            method_label = METHOD_LABELS.get(method_key, "Accelerated")
            return [f"**{'Baseline' if compare else method_label}**", gr.update(visible=compare), f"**{method_label}**"]

        examples.click(lambda sample: sample[0], [examples], [prompt], api_visibility="private")

        # The layout step is UI-only; /generate and /compare return plain values for API clients.
        for button, is_compare in ((generate_btn, False), (compare_btn, True)):
            fn = endpoint(is_compare)
            button.click(
                lambda m, c=is_compare: layout(c, m),
                [method],
                [left_title, right_col, right_title],
                api_visibility="private",
                queue=False,
            ).then(
                fn,
                inputs,
                outputs,
                api_name=fn.__name__,
                concurrency_limit=8,
                concurrency_id="runs",
                # the request's own rules see what the client sent (Gradio would str() a number
                # given as the prompt, and check choices with a message of its own)
                preprocess=False,
                show_progress_on=[run_status],
            )
        race_outputs = [race_gallery, *race_audio, race_table, race_plot, race_details, race_status, last_race]

        def race(
            prompt: str,
            model: str = names[0] if names else "",
            negative_prompt: str = "",
            methods: list[str] | None = None,
            warmup_steps: int = 2,
            stride: int = 2,
            steps: int | None = None,
            guidance_scale: float | None = None,
            seed: int = 0,
            height: int | None = None,
            width: int | None = None,
            num_frames: int | None = None,
            duration_s: float | None = None,
            sparsetem: bool = False,
            progress: gr.Progress = gr.Progress(),  # noqa: B008 - how Gradio injects progress
        ) -> Iterator[dict[Any, Any]]:
            """Run several methods on the same prompt and seed, one after another, each against the
            baseline: media side by side, one latency table, per-rank timelines."""
            req = GenerateRequest(
                prompt=prompt,
                model=model,
                negative_prompt=negative_prompt,
                warmup_steps=warmup_steps,
                stride=stride,
                steps=steps,
                guidance_scale=guidance_scale,
                seed=seed,
                height=height,
                width=width,
                num_frames=num_frames,
                duration_s=duration_s,
                sparsetem=sparsetem,
            )
            try:
                job = backend.submit_race(req, ["baseline", "parastep", "batchstep"] if methods is None else methods)
            except (InputError, RunError) as exc:
                raise _error(exc) from None
            for note in job.warnings:
                gr.Warning(note)
            try:
                for event in job.stream():
                    if isinstance(event, Progress):
                        desc = f"{event.label}: step {event.step}/{event.total}" if event.step else event.label
                        progress(event.step / max(1, event.total), desc=desc)
                    elif isinstance(event, RaceOutput):
                        yield dict(zip(race_outputs, _race_values(event, job.warnings), strict=True))
            except (InputError, RunError) as exc:
                raise _error(exc) from None
            finally:
                job.cancel()

        race_btn.click(
            race,
            [prompt, model, negative, race_methods, *inputs[4:]],
            race_outputs,
            api_name="race",
            concurrency_limit=8,
            concurrency_id="runs",
            preprocess=False,
            show_progress_on=[race_status],
        )

        def export(result: RaceOutput | None) -> str:
            """The last race of this session as one side-by-side file (PNG grid, or MP4)."""
            if result is None:
                raise gr.Error("Run a race first: Share exports the last one.", title="Nothing to share")
            return str(
                share.export_race(
                    _share_entries(result),
                    result.baseline.modality,
                    media.output_dir(),
                    fps=result.baseline.fps,
                    sample_rate=result.baseline.sample_rate,
                )
            )

        share_btn.click(export, [last_race], [race_share], api_name="share", concurrency_id="runs")
        refresh.click(backend.status, None, cluster, api_name="status")
    return demo
