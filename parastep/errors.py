"""Typed errors. Every message says what to change."""


class ParaStepError(RuntimeError):
    """Base class of every error the engine raises."""


class ConfigError(ParaStepError, ValueError):
    """A configuration that cannot run: wrong degree, warm-up, stride or process group."""


class UnsupportedPipelineError(ParaStepError):
    """The pipeline has no recognisable denoiser/scheduler, or its denoiser input cannot be rebuilt."""


class UnsupportedSchedulerError(ParaStepError):
    """The scheduler cannot be used with the chosen strategy."""


class CommError(ParaStepError):
    """A peer rank did not answer in time or went away; the message names the rank."""
