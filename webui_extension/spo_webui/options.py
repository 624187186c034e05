"""The SPO sampler's options: what the always-visible script passes to the sampler through `p`,
with defaults from the settings, and how they are written to and read from the infotext."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from spo_core.errors import ConfigError, WeightsNotFoundError

POLICIES = ["greedy", "softmax", "random", "fk"]
POTENTIALS = ["max", "diff", "add", "rt"]
# infotext keys, in the order the script's arguments come (API: alwayson_scripts args)
INFOTEXT = {"k": "SPO k", "policy": "SPO policy", "window": "SPO window", "scorer": "SPO scorer",
            "weights": "SPO scorer weights", "score_every": "SPO every", "potential": "SPO potential",
            "lam": "SPO lambda", "adaptive": "SPO adaptive"}
# the FK fields come last, so older API calls (7 arguments) keep working
ARG_NAMES = ["k", "policy", "window_lo", "window_hi", "scorer", "weights", "score_every", "potential", "lam", "adaptive"]


@dataclass
class SPOOptions:
    k: int = 4
    policy: str = "greedy"
    window_lo: float = 0.0
    window_hi: float = 751.0
    scorer: str = "spm"
    weights: str = ""  # file or folder name inside the scorer folder (or an absolute path)
    score_every: int = 1
    potential: str = "max"  # fk: the particles' potential
    lam: float = 10.0  # fk: lambda
    adaptive: bool = False  # fk: resample only when the ESS < k/2
    scorer_dir: Path | None = field(default=None, repr=False)

    def validate(self) -> "SPOOptions":
        if self.k < 1 or self.k > 64:
            raise ConfigError(f"SPO k must be between 1 and 64, got {self.k}")
        if self.policy not in POLICIES:
            raise ConfigError(f"SPO policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.window_lo > self.window_hi:
            raise ConfigError(f"SPO window: the lowest timestep {self.window_lo:g} is above the highest {self.window_hi:g}")
        if self.score_every < 1:
            raise ConfigError("SPO: pool every n-th step needs n >= 1")
        if self.policy == "fk":
            if self.k < 2:
                raise ConfigError("SPO FK steering with 1 particle is plain sampling: use k (particles) >= 2")
            if self.potential not in POTENTIALS:
                raise ConfigError(f"SPO FK potential must be one of {', '.join(POTENTIALS)}, got {self.potential!r}")
            if not self.lam > 0 or self.lam != self.lam or self.lam == float("inf"):
                raise ConfigError(f"SPO FK lambda must be a finite number > 0, got {self.lam}")
        return self

    def weights_path(self) -> Path | None:
        """The scorer's weights, resolved inside the scorer folder; None for scorers without weights."""
        from spo_core.scorers import SCORERS

        info = SCORERS.get(self.scorer)
        if info is None:
            raise ConfigError(f"unknown SPO scorer {self.scorer!r}; choose one of {', '.join(SCORERS)}")
        if not info.needs_weights:
            return None
        folder = self.scorer_dir
        if not self.weights:
            raise WeightsNotFoundError(
                f"the SPO sampler's scorer {self.scorer!r} needs weights: put {info.weights_hint} into "
                f"{folder or 'models/SPO'} and choose it in the SPO sampler options (or in Settings > SPO)")
        p = Path(self.weights)
        if not p.is_absolute() and folder is not None:
            p = folder / p
        if not p.exists():
            raise WeightsNotFoundError(f"SPO scorer weights not found: {p} ({info.weights_hint})")
        return p

    def infotext(self) -> dict[str, Any]:
        out = {INFOTEXT["k"]: self.k, INFOTEXT["policy"]: self.policy,
               INFOTEXT["window"]: f"{self.window_lo:g}-{self.window_hi:g}", INFOTEXT["scorer"]: self.scorer}
        if self.weights:
            out[INFOTEXT["weights"]] = Path(self.weights).name
        if self.score_every != 1:
            out[INFOTEXT["score_every"]] = self.score_every
        if self.policy == "fk":
            out[INFOTEXT["potential"]] = self.potential
            out[INFOTEXT["lam"]] = self.lam
            if self.adaptive:
                out[INFOTEXT["adaptive"]] = True
        return out


def from_args(args: Sequence[Any], defaults: SPOOptions | None = None) -> SPOOptions:
    """Script arguments (UI components or API `alwayson_scripts` args, in ARG_NAMES order) -> options.
    Missing trailing arguments keep their defaults."""
    d = defaults or SPOOptions()
    values = dict(zip(ARG_NAMES, args))
    try:
        opts = SPOOptions(
            k=int(values.get("k", d.k)),
            policy=str(values.get("policy", d.policy) or d.policy),
            window_lo=float(values.get("window_lo", d.window_lo)),
            window_hi=float(values.get("window_hi", d.window_hi)),
            scorer=str(values.get("scorer", d.scorer) or d.scorer),
            weights=str(values.get("weights", d.weights) or ""),
            score_every=int(values.get("score_every", d.score_every) or 1),
            potential=str(values.get("potential", d.potential) or d.potential),
            lam=float(values.get("lam", d.lam)),
            adaptive=_bool(values.get("adaptive", d.adaptive)),
            scorer_dir=d.scorer_dir,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"SPO sampler options {list(args)!r}: {exc}; expected {ARG_NAMES}") from exc
    if opts.weights in ("None", "none"):
        opts.weights = ""
    return opts.validate()


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def parse_window(text: str) -> tuple[float, float]:
    lo, _, hi = str(text).partition("-")
    return float(lo), float(hi)


def defaults_from_settings() -> SPOOptions:
    """Defaults from Settings > SPO (also used by API calls that leave the script out)."""
    from modules import shared

    from . import webui

    o = shared.opts
    return SPOOptions(
        k=int(getattr(o, "spo_default_k", 4)),
        policy=str(getattr(o, "spo_default_policy", "greedy")),
        window_lo=0.0,
        window_hi=float(getattr(o, "spo_default_window_hi", 751)),
        scorer=str(getattr(o, "spo_default_scorer", "spm")),
        weights=str(getattr(o, "spo_default_scorer_weights", "") or ""),
        scorer_dir=webui.scorer_dir(),
    )


class InvalidOptions:
    """Options that did not parse; the sampler raises the error when it runs (then the page shows it)."""

    def __init__(self, error: BaseException):
        self.error = error


def options_from_p(p: Any) -> SPOOptions:
    """The options the script stored on `p`, else the settings' defaults."""
    opts = getattr(p, "spo_options", None)
    if isinstance(opts, InvalidOptions):
        raise opts.error
    if isinstance(opts, SPOOptions):
        return opts
    return defaults_from_settings().validate()
