"""Sampler names -> diffusers schedulers for sample images (specs/training.md section 8.3).

The names are sd-scripts' `--sample_sampler` / `--ss` choices, plus the `dpm++_2m` spellings its docs suggest.
Every scheduler gets the training schedule (1000 steps, scaled-linear betas 0.00085..0.012), v-prediction when the
model is a v-prediction model, and `clip_sample` on where the scheduler has that setting, as sd-scripts forces it.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import DummyObject

from library.errors import UserError
from library.training.diffusion import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS


@dataclass(frozen=True)
class Sampler:
    scheduler_class: type
    options: Mapping[str, object] = field(default_factory=dict)


DPM_SOLVER_PLUS_PLUS = Sampler(DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"})
SAMPLERS: dict[str, Sampler] = {
    "ddim": Sampler(DDIMScheduler),
    "pndm": Sampler(PNDMScheduler),
    "lms": Sampler(LMSDiscreteScheduler),
    "k_lms": Sampler(LMSDiscreteScheduler),
    "euler": Sampler(EulerDiscreteScheduler),
    "k_euler": Sampler(EulerDiscreteScheduler),
    "euler_a": Sampler(EulerAncestralDiscreteScheduler),
    "k_euler_a": Sampler(EulerAncestralDiscreteScheduler),
    "heun": Sampler(HeunDiscreteScheduler),
    "dpm_2": Sampler(KDPM2DiscreteScheduler),
    "k_dpm_2": Sampler(KDPM2DiscreteScheduler),
    "dpm_2_a": Sampler(KDPM2AncestralDiscreteScheduler),
    "k_dpm_2_a": Sampler(KDPM2AncestralDiscreteScheduler),
    # diffusers only runs the first-order "dpmsolver" algorithm with a last step to sigma_min, not to zero.
    "dpmsolver": Sampler(
        DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}
    ),
    "dpmsolver++": DPM_SOLVER_PLUS_PLUS,
    "dpm++_2m": DPM_SOLVER_PLUS_PLUS,
    "dpm++_2m_karras": Sampler(
        DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}
    ),
    "dpmsingle": Sampler(DPMSolverSinglestepScheduler),
}
SAMPLER_NAMES = tuple(SAMPLERS)
DEFAULT_SAMPLER = "ddim"


def check_sampler(name: str, where: str = "") -> str:
    """The sampler's name as the table spells it (case and surrounding spaces ignored). An unknown name, or one
    whose scheduler needs a package that is not installed, is a UserError; `where` (e.g. "--sample_sampler" or a
    file and line) starts its message."""
    prefix = f"{where}: " if where else ""
    canonical = name.strip().lower()
    if canonical not in SAMPLERS:
        raise UserError(f"{prefix}unknown sampler '{name}'; use one of {', '.join(SAMPLER_NAMES)}.")
    scheduler_class = SAMPLERS[canonical].scheduler_class
    if isinstance(scheduler_class, DummyObject):
        missing = " and ".join(backend for backend in scheduler_class._backends if backend != "torch")
        raise UserError(
            f"{prefix}sampler '{canonical}' needs the {missing} package;"
            f" install it with `pip install {missing}` or choose another sampler."
        )
    return canonical


def make_scheduler(name: str, v_prediction: bool) -> SchedulerMixin:
    """A fresh scheduler for the named sampler with sd-scripts' sampling settings."""
    sampler = SAMPLERS[check_sampler(name)]
    options = dict(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction" if v_prediction else "epsilon",
        **sampler.options,
    )
    if "clip_sample" in inspect.signature(sampler.scheduler_class.__init__).parameters:
        options["clip_sample"] = True
    with warnings.catch_warnings():
        # diffusers announces the end of algorithm_type "dpmsolver" on every construction; sd-scripts offers it.
        warnings.filterwarnings("ignore", message=".*algorithm_type dpmsolver is deprecated", category=FutureWarning)
        return sampler.scheduler_class(**options)
