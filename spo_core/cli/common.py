"""What several verbs share: one name per flag (older names kept as hidden aliases), `world` defaults."""

from __future__ import annotations

import argparse


def alias(parser, *flags: str, dest: str, **kw) -> None:
    """Hidden alias flags for an argument declared elsewhere (they set the same `dest`)."""
    parser.add_argument(*flags, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)


def add_scorer_weights(parser, help_text: str | None = None) -> None:
    parser.add_argument("--scorer-weights", dest="scorer_weights", metavar="PATH",
                        help=help_text or "the scorer's weights file or folder ('world': the embedded world's SPM)")
    alias(parser, "--weights", "--scorer-path", dest="scorer_weights")


def add_no_progress(parser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    alias(parser, "--quiet", dest="no_progress", action="store_true")


def default_world_scorer(model: str | None, scorer: str | None, weights: str | None) -> tuple[str | None, str | None]:
    """With `--model world`, the world's SPM is the scorer unless another one is named; the world's own
    weights for its SPM or latent reward model."""
    from ..model_names import is_flow_world, is_world

    if is_flow_world(model):  # the world's SPM scores the flow model's pictures too (no latent scorer for it)
        return (scorer or "spm", "world") if scorer in (None, "spm") and not weights else (scorer, weights)
    if not is_world(model):
        return scorer, weights
    if scorer in (None, "spm", "lrm") and not weights:
        return scorer or "spm", "world"
    return scorer, weights
