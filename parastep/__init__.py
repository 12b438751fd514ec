"""ParaStep: step-parallel diffusion denoising for any diffusers pipeline.

Example::

    import parastep
    handle = parastep.apply(pipe, parastep.ParaStepConfig(warmup_steps=5))  # P = group size
    out = pipe(prompt, num_inference_steps=50)      # called exactly as before, on every rank
    print(handle.last_stats.model_calls)
    handle.remove()
"""
from .config import BatchStepConfig, ParaStepConfig, ideal_speedup
from .engine import Handle, apply
from .errors import CommError, ConfigError, ParaStepError, UnsupportedPipelineError, UnsupportedSchedulerError
from .registry import FAMILIES, PipelineSpec, spec_for
from .stats import RunStats, StepRecord

__all__ = [
    "BatchStepConfig", "ParaStepConfig", "ideal_speedup", "Handle", "apply", "CommError", "ConfigError",
    "ParaStepError", "UnsupportedPipelineError", "UnsupportedSchedulerError", "FAMILIES", "PipelineSpec",
    "spec_for", "RunStats", "StepRecord",
]
