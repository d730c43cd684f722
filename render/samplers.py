"""Samplers and schedule types by their AUTOMATIC1111 names, mapped onto diffusers schedulers.

Users copy sampler names from A1111 (and from infotexts on civitai), so a job says
``sampler: DPM++ 2M Karras`` or, A1111 1.9+ style, ``sampler: DPM++ 2M`` plus a separate
schedule type. This module is pure Python (validation and ``--dry-run`` use it without torch);
only :func:`make_scheduler` imports diffusers, inside the function.

How the names are read (decisions where neither A1111 nor diffusers settle it):

- ``Automatic`` means what it means in A1111 1.9+: the sampler's own default schedule
  (DPM++ 2M -> Karras, DPM++ 2M SDE -> Exponential, ...), and for samplers without one the
  model's evenly spaced schedule. So ``DPM++ 2M`` and ``DPM++ 2M Karras`` render the same
  image, exactly as in A1111 1.9+. Automatic never depends on which scheduler the resident
  pipeline happened to hold before, only on the sampler.
- The old combined form keeps its schedule: ``"DPM++ 2M Karras"`` -> ``("DPM++ 2M", "Karras")``
  (A1111 would fold a sampler's own default back to ``Automatic``; we keep what was written).
- A schedule a diffusers scheduler cannot do (``Euler a`` + ``Karras``: EulerAncestral has no
  Karras sigmas) is a ``ValueError`` at validation time, never a silent substitute.
- Names A1111 has but diffusers cannot do honestly (``DPM fast``, ``DPM adaptive``,
  ``Restart``, ``Polyexponential`` ...) are rejected with the reason, not mapped to a
  look-alike.
- ``DPM++ SDE``: diffusers documents DPMSolverSinglestepScheduler for it. The exact port of
  k-diffusion's sampler, DPMSolverSDEScheduler, needs ``torchsde`` and draws its Brownian noise
  from a seed of its own (the global torch RNG unless told otherwise) instead of the per-image
  ``torch.Generator``: a seed would no longer give the same image in any batch, and an image
  would depend on whether torchsde is installed. We therefore use the documented singlestep
  scheduler in its stochastic form (``algorithm_type="sde-dpmsolver++"``), on every machine.

What is written to the infotext follows A1111 1.9+: ``Sampler: <name>`` always, and
``Schedule type: <label>`` whenever the schedule actually used is not the model's plain one,
which includes ``Automatic`` resolving to a sampler's default (DPM++ 2M -> ``Karras``).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "SamplerSpec",
    "check_supported",
    "infotext_sampler",
    "make_scheduler",
    "parse_sampler",
    "parse_schedule",
    "resolve_sampler",
    "resolved_schedule",
    "sampler_spec",
    "scheduler_config",
]

AUTOMATIC = "Automatic"

# Schedule types we can build, with the diffusers config each one sets. Spacing names the
# timesteps a sigma schedule starts from; "linspace" (t from 999 down to 0) is what A1111's
# model schedule uses, and Karras/Exponential/Beta take their sigma range from it, so they
# span the model's full sigma range as in A1111.
_SCHEDULE_CONFIGS: dict[str, dict[str, Any]] = {
    # A1111 "Uniform" and "Normal" are both t = linspace(999, 0, n): diffusers' linspace.
    "Uniform": {"timestep_spacing": "linspace"},
    "Karras": {"use_karras_sigmas": True, "timestep_spacing": "linspace"},
    "Exponential": {"use_exponential_sigmas": True, "timestep_spacing": "linspace"},
    # sgm_uniform and simple both drop t=0 and start at 999: diffusers' "trailing" (its docs).
    "SGM Uniform": {"timestep_spacing": "trailing"},
    "Simple": {"timestep_spacing": "trailing"},
    "Normal": {"timestep_spacing": "linspace"},
    # A1111's "DDIM" schedule: every (1000 // n)-th timestep from 1, i.e. leading + offset 1.
    "DDIM": {"timestep_spacing": "leading", "steps_offset": 1},
    # diffusers' beta sigmas use alpha = beta = 0.6, A1111's defaults.
    "Beta": {"use_beta_sigmas": True, "timestep_spacing": "linspace"},
}

#: Every schedule type accepted, ``Automatic`` first (A1111's order after that).
SCHEDULES: tuple[str, ...] = (AUTOMATIC, *_SCHEDULE_CONFIGS)

# Extra spellings: A1111's internal scheduler ids and its one alias.
_SCHEDULE_ALIASES: dict[str, str] = {
    "sgm_uniform": "SGM Uniform",
    "SGMUniform": "SGM Uniform",
}

# A1111 schedule types with no honest diffusers equivalent, and why.
_UNSUPPORTED_SCHEDULES: dict[str, str] = {
    "Polyexponential": "diffusers has no polyexponential sigma schedule",
    "KL Optimal": "diffusers has no KL-optimal sigma schedule",
    "Align Your Steps": "diffusers has no Align-Your-Steps schedule flag for these schedulers",
}

_SIGMA = frozenset({"Karras", "Exponential", "Beta"})
_SPACING = frozenset({"Uniform", "Normal", "SGM Uniform", "Simple", "DDIM"})
_ALL = _SIGMA | _SPACING


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: the diffusers scheduler that runs it and what A1111's names imply.

    ``default_schedule`` is what A1111 1.9+ uses for ``Automatic`` (and writes to the
    infotext); ``automatic`` is the schedule used silently when there is no default.
    ``native_spacing`` is set for schedulers without a ``timestep_spacing`` option.
    ``note`` says where the mapping only approximates A1111; ``a1111`` is False for a name
    A1111 does not have (DEIS).
    """

    name: str
    scheduler: str
    config: Mapping[str, Any]
    schedules: frozenset[str]
    default_schedule: str | None = None
    automatic: str = "Uniform"
    native_spacing: str | None = None
    aliases: tuple[str, ...] = ()
    note: str = ""
    a1111: bool = True


def _spec(name: str, scheduler: str, schedules: frozenset[str], **kw: Any) -> SamplerSpec:
    config = MappingProxyType(dict(kw.pop("config", {})))
    return SamplerSpec(name=name, scheduler=scheduler, config=config, schedules=schedules, **kw)


# (The singlestep scheduler gets lower_order_final=True up front: with its default False it
# switches the option on itself, with a warning, whenever a render ends at sigma 0.)
_SPECS: tuple[SamplerSpec, ...] = (
    _spec("DPM++ 2M", "DPMSolverMultistepScheduler", _ALL,
          config={"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"},
          default_schedule="Karras", aliases=("k_dpmpp_2m",)),
    _spec("DPM++ SDE", "DPMSolverSinglestepScheduler", _SIGMA | {"Uniform", "Normal"},
          config={"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                  "lower_order_final": True},
          default_schedule="Karras", native_spacing="linspace", aliases=("k_dpmpp_sde",),
          note="approximation: stochastic singlestep DPM-Solver++ with per-step Gaussian noise "
               "(k-diffusion uses a Brownian tree); see the module docstring"),
    _spec("DPM++ 2M SDE", "DPMSolverMultistepScheduler", _ALL,
          config={"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                  "solver_type": "midpoint"},
          default_schedule="Exponential", aliases=("k_dpmpp_2m_sde",)),
    _spec("DPM++ 2M SDE Heun", "DPMSolverMultistepScheduler", _ALL,
          config={"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "heun"},
          default_schedule="Exponential", aliases=("k_dpmpp_2m_sde_heun",)),
    _spec("DPM++ 2S a", "DPMSolverSinglestepScheduler", _SIGMA | {"Uniform", "Normal"},
          config={"algorithm_type": "dpmsolver++", "solver_order": 2,
                  "lower_order_final": True},
          default_schedule="Karras", native_spacing="linspace", aliases=("k_dpmpp_2s_a",),
          note="approximation: diffusers has no ancestral DPM++ 2S; its docs point to the "
               "deterministic singlestep DPM-Solver++ (no ancestral noise)"),
    _spec("DPM++ 3M SDE", "DPMSolverMultistepScheduler", _ALL,
          config={"algorithm_type": "sde-dpmsolver++", "solver_order": 3,
                  "solver_type": "midpoint"},
          default_schedule="Exponential", aliases=("k_dpmpp_3m_sde",),
          note="A1111 also discards the penultimate sigma; diffusers does not"),
    _spec("Euler a", "EulerAncestralDiscreteScheduler", _SPACING,
          aliases=("k_euler_a", "k_euler_ancestral")),
    _spec("Euler", "EulerDiscreteScheduler", _ALL, aliases=("k_euler",)),
    _spec("LMS", "LMSDiscreteScheduler", _ALL, aliases=("k_lms",)),
    _spec("Heun", "HeunDiscreteScheduler", _ALL, aliases=("k_heun",)),
    _spec("DPM2", "KDPM2DiscreteScheduler", _ALL, default_schedule="Karras",
          aliases=("k_dpm_2",),
          note="A1111 also discards the penultimate sigma; diffusers does not"),
    _spec("DPM2 a", "KDPM2AncestralDiscreteScheduler", _ALL, default_schedule="Karras",
          aliases=("k_dpm_2_a",),
          note="A1111 also discards the penultimate sigma; diffusers does not"),
    # ldm's DDIM/PLMS with "uniform" discretisation: every (1000 // n)-th step from 1, no
    # x0 clipping, final alpha from t=0 (set_alpha_to_one=False), eta from the call (A1111: 0).
    _spec("DDIM", "DDIMScheduler", _SPACING, automatic="DDIM",
          config={"clip_sample": False, "set_alpha_to_one": False}),
    _spec("PLMS", "PNDMScheduler", _SPACING, automatic="DDIM",
          config={"skip_prk_steps": True, "set_alpha_to_one": False}),
    # A1111's UniPC defaults: variant bh1, order 3, time-uniform steps, lower order at the end,
    # stopping at the model's smallest sigma (t = 1/1000) rather than 0. (diffusers 0.42's bh1
    # with final_sigmas_type="zero" returns NaN: its last step divides by an infinite lambda.)
    _spec("UniPC", "UniPCMultistepScheduler", _ALL,
          config={"solver_type": "bh1", "solver_order": 3, "lower_order_final": True,
                  "final_sigmas_type": "sigma_min"},
          aliases=("unipc",)),
    _spec("LCM", "LCMScheduler", frozenset(), automatic="DDIM",
          config={"clip_sample": False, "set_alpha_to_one": False}, aliases=("k_lcm",),
          note="diffusers' LCMScheduler picks its own timesteps from original_inference_steps "
               "(50); no other schedule type applies"),
    # Not in A1111 (ComfyUI has it as "deis"); an exact algorithm in diffusers.
    _spec("DEIS", "DEISMultistepScheduler", _ALL, aliases=("deis",), a1111=False),
)

_BY_NAME: dict[str, SamplerSpec] = {s.name: s for s in _SPECS}

#: Every sampler name accepted, canonical spelling, A1111's UI order.
SAMPLERS: tuple[str, ...] = tuple(s.name for s in _SPECS)

# Old A1111 aliases naming a sampler together with a schedule.
_COMBINED_ALIASES: dict[str, tuple[str, str]] = {
    "k_lms_ka": ("LMS", "Karras"),
    "k_dpm_2_ka": ("DPM2", "Karras"),
    "k_dpm_2_a_ka": ("DPM2 a", "Karras"),
    "k_dpmpp_2s_a_ka": ("DPM++ 2S a", "Karras"),
    "k_dpmpp_2m_ka": ("DPM++ 2M", "Karras"),
    "k_dpmpp_sde_ka": ("DPM++ SDE", "Karras"),
    "k_dpmpp_2m_sde_ka": ("DPM++ 2M SDE", "Karras"),
    "k_dpmpp_2m_sde_heun_ka": ("DPM++ 2M SDE Heun", "Karras"),
    "k_dpmpp_2m_sde_heun_exp": ("DPM++ 2M SDE Heun", "Exponential"),
    "k_dpmpp_3m_sde_ka": ("DPM++ 3M SDE", "Karras"),
    "k_dpmpp_3m_sde_exp": ("DPM++ 3M SDE", "Exponential"),
}

# A1111 samplers with no honest diffusers equivalent, and why.
_UNSUPPORTED_SAMPLERS: dict[str, str] = {
    "DPM fast": "diffusers has no fixed-order DPM-Solver-fast scheduler",
    "DPM adaptive": "diffusers has no adaptive-step DPM-Solver (its step count is not fixed)",
    "Restart": "diffusers has no Restart sampler",
    "DDIM CFG++": "CFG++ changes the guidance formula, which a diffusers scheduler cannot do",
    "Euler CFG++": "CFG++ changes the guidance formula, which a diffusers scheduler cannot do",
}

# Keys that describe the model's training noise, carried over from the pipeline's scheduler
# config. Everything else (spacing, sigma flags, solver options) comes from the sampler and
# schedule, so a previously installed scheduler cannot leak settings into the next one.
_MODEL_KEYS: tuple[str, ...] = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "rescale_betas_zero_snr",
)
# Values of model keys that equal "not used", so a scheduler without the option can drop them.
_NEUTRAL: dict[str, Any] = {"rescale_betas_zero_snr": False, "trained_betas": None}


def sampler_spec(sampler: str) -> SamplerSpec:
    """The table entry for a sampler name in either form (``ValueError`` as parse_sampler)."""
    return _BY_NAME[parse_sampler(sampler)[0]]


def _key(text: str) -> str:
    """Case- and whitespace-insensitive lookup key."""
    return " ".join(text.split()).casefold()


_SAMPLER_KEYS: dict[str, str] = {}
for _s in _SPECS:
    _SAMPLER_KEYS[_key(_s.name)] = _s.name
    for _a in _s.aliases:
        _SAMPLER_KEYS[_key(_a)] = _s.name

_SCHEDULE_KEYS: dict[str, str] = {_key(label): label for label in SCHEDULES}
_SCHEDULE_KEYS.update({_key(a): label for a, label in _SCHEDULE_ALIASES.items()})
_SCHEDULE_KEYS.update({_key(label.replace(" ", "_")): label for label in SCHEDULES})

_UNSUPPORTED_SAMPLER_KEYS = {_key(n): n for n in _UNSUPPORTED_SAMPLERS}
_UNSUPPORTED_SCHEDULE_KEYS = {_key(n): n for n in _UNSUPPORTED_SCHEDULES}
_UNSUPPORTED_SCHEDULE_KEYS.update(
    {_key(n.replace(" ", "_")): n for n in _UNSUPPORTED_SCHEDULES}
)


def _did_you_mean(text: str, candidates: list[str]) -> str:
    keyed = {_key(c): c for c in candidates}
    close = difflib.get_close_matches(_key(text), list(keyed), n=3, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(keyed[c]) for c in close) + "?"


def _known_samplers() -> str:
    return "known samplers: " + ", ".join(SAMPLERS)


def _known_schedules() -> str:
    return "known schedule types: " + ", ".join(SCHEDULES)


def parse_schedule(text: str) -> str:
    """Return the canonical schedule type for ``text`` (any case; A1111 ids such as
    ``sgm_uniform`` accepted). Raises ``ValueError`` naming the known ones."""
    if not isinstance(text, str):
        raise ValueError(f"schedule type must be a string, got {text!r}; {_known_schedules()}")
    key = _key(text)
    if key in _SCHEDULE_KEYS:
        return _SCHEDULE_KEYS[key]
    if key in _UNSUPPORTED_SCHEDULE_KEYS:
        name = _UNSUPPORTED_SCHEDULE_KEYS[key]
        raise ValueError(
            f"schedule type {name!r} is not supported: {_UNSUPPORTED_SCHEDULES[name]}; "
            f"{_known_schedules()}"
        )
    hint = _did_you_mean(text, list(SCHEDULES))
    raise ValueError(f"unknown schedule type {text!r}{hint}; {_known_schedules()}")


def check_supported(sampler: str, schedule: str) -> None:
    """Raise ``ValueError`` unless canonical ``sampler`` can run with canonical ``schedule``."""
    spec = _BY_NAME[sampler]
    if schedule == AUTOMATIC or schedule in spec.schedules:
        return
    can = ", ".join(s for s in SCHEDULES if s == AUTOMATIC or s in spec.schedules)
    raise ValueError(
        f"sampler {sampler!r} cannot use schedule type {schedule!r}: diffusers' "
        f"{spec.scheduler} has no such option; it can use: {can}"
    )


def parse_sampler(text: str) -> tuple[str, str]:
    """Split an A1111 sampler name into ``(sampler, schedule type)``, canonically spelled.

    ``"Euler a"`` -> ``("Euler a", "Automatic")``; the pre-1.9 combined form
    ``"DPM++ 2M Karras"`` -> ``("DPM++ 2M", "Karras")``. Matching ignores case and repeated
    spaces; A1111's ``k_*`` aliases are accepted. Unknown names raise ``ValueError`` listing
    the known names with a did-you-mean.
    """
    if not isinstance(text, str):
        raise ValueError(f"sampler must be a string, got {text!r}; {_known_samplers()}")
    key = _key(text)
    if key in _SAMPLER_KEYS:
        return _SAMPLER_KEYS[key], AUTOMATIC
    if key in _COMBINED_ALIASES:
        return _COMBINED_ALIASES[key]
    # combined form: "<sampler> <schedule>", the longest schedule suffix that leaves a sampler
    suffixes = sorted(
        [*_SCHEDULE_KEYS.items(), *_UNSUPPORTED_SCHEDULE_KEYS.items()],
        key=lambda kv: len(kv[0]),
        reverse=True,
    )
    for suffix, label in suffixes:
        if not key.endswith(" " + suffix):
            continue
        head = key[: -len(suffix) - 1]
        if head in _UNSUPPORTED_SAMPLER_KEYS:
            break
        if head not in _SAMPLER_KEYS:
            continue
        sampler = _SAMPLER_KEYS[head]
        schedule = parse_schedule(label)  # raises for the unsupported ones, with the reason
        check_supported(sampler, schedule)
        return sampler, schedule
    for bad_key, name in _UNSUPPORTED_SAMPLER_KEYS.items():
        if key == bad_key or key.startswith(bad_key + " "):
            raise ValueError(
                f"sampler {name!r} is not supported: {_UNSUPPORTED_SAMPLERS[name]}; "
                f"{_known_samplers()}"
            )
    combined = [f"{s.name} {sch}" for s in _SPECS for sch in sorted(s.schedules)]
    hint = _did_you_mean(text, [*SAMPLERS, *combined])
    raise ValueError(f"unknown sampler {text!r}{hint} {_known_samplers()}; {_known_schedules()}")


def resolve_sampler(sampler: str, schedule: str | None = None) -> tuple[str, str]:
    """Combine a sampler name (either form) with an optional separate schedule type.

    A schedule given twice must agree (``"DPM++ 2M Karras"`` with ``"Exponential"`` is an
    error); ``Automatic`` or ``None`` defers to the sampler name. The pair is checked for
    support, so this is the one call a job validator needs.
    """
    name, from_name = parse_sampler(sampler)
    given = AUTOMATIC if schedule is None else parse_schedule(schedule)
    if given == AUTOMATIC:
        result = from_name
    elif from_name in (AUTOMATIC, given):
        result = given
    else:
        raise ValueError(
            f"sampler {sampler!r} already names schedule type {from_name!r}, "
            f"but schedule type {given!r} was also given"
        )
    check_supported(name, result)
    return name, result


def resolved_schedule(sampler: str, schedule: str | None = AUTOMATIC) -> str | None:
    """The schedule A1111 1.9+ reports for this pair: ``Automatic`` becomes the sampler's
    default, or ``None`` (nothing written) when the sampler has none."""
    name, sched = resolve_sampler(sampler, schedule)
    if sched == AUTOMATIC:
        return _BY_NAME[name].default_schedule
    return sched


def infotext_sampler(sampler: str, schedule: str | None = AUTOMATIC) -> dict[str, str]:
    """The infotext fields A1111 1.9+ writes for this sampler and schedule type.

    ``Sampler`` is the bare name; ``Schedule type`` appears when the schedule used is not the
    model's plain one, including an ``Automatic`` that resolved to the sampler's default
    (``DPM++ 2M`` -> ``Schedule type: Karras``), as A1111 does. A1111 adds
    ``Beta schedule alpha/beta`` for Beta; diffusers uses its defaults, 0.6 and 0.6.
    """
    name, _ = resolve_sampler(sampler, schedule)
    fields = {"Sampler": name}
    used = resolved_schedule(sampler, schedule)
    if used is not None:
        fields["Schedule type"] = used
        if used == "Beta":
            fields["Beta schedule alpha"] = "0.6"
            fields["Beta schedule beta"] = "0.6"
    return fields


def scheduler_config(
    sampler: str, schedule: str | None = AUTOMATIC
) -> tuple[str, dict[str, Any]]:
    """The diffusers class name and config overrides for this pair (pure Python)."""
    name, sched = resolve_sampler(sampler, schedule)
    spec = _BY_NAME[name]
    label = sched if sched != AUTOMATIC else (spec.default_schedule or spec.automatic)
    config = dict(spec.config)
    config.update(_SCHEDULE_CONFIGS[label])
    return spec.scheduler, config


def make_scheduler(
    sampler: str, schedule: str | None, base_config: Mapping[str, Any]
) -> Any:
    """Build the diffusers scheduler for ``sampler`` + ``schedule`` on the model's noise.

    ``sampler`` may be the combined form; ``schedule`` ``None`` means ``Automatic``.
    ``base_config`` is the pipeline's ``pipe.scheduler.config``: only the model's training
    noise is taken from it (betas, ``num_train_timesteps``, ``prediction_type`` for
    v-prediction SD2, ``rescale_betas_zero_snr``), so whatever scheduler was installed before
    cannot leak its options into this one. Raises ``ValueError`` for an unknown name or a
    combination the scheduler cannot do (including a model option it lacks, such as
    zero-terminal-SNR betas on a scheduler without ``rescale_betas_zero_snr``).
    """
    import inspect

    import diffusers

    class_name, overrides = scheduler_config(sampler, schedule)
    name, sched = resolve_sampler(sampler, schedule)
    spec = _BY_NAME[name]
    cls = getattr(diffusers, class_name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}

    config: dict[str, Any] = {}
    for key in _MODEL_KEYS:
        if key not in base_config:
            continue
        value = base_config[key]
        if key in accepted:
            config[key] = value
        elif key in _NEUTRAL and value == _NEUTRAL[key]:
            continue
        else:
            raise ValueError(
                f"sampler {name!r} ({class_name}) cannot run this model: its scheduler config "
                f"sets {key}={value!r}, which {class_name} does not support"
            )
    for key, value in overrides.items():
        if key in accepted:
            config[key] = value
        elif key == "timestep_spacing" and value == spec.native_spacing:
            continue  # the scheduler always spaces its steps this way
        else:
            raise ValueError(
                f"sampler {name!r} with schedule type {sched!r} needs {key}={value!r}, "
                f"which this diffusers version's {class_name} does not accept"
            )
    return cls.from_config(config)
