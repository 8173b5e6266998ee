"""Loss landscapes: 1-D and 2-D cuts of the loss through weight space (Li et al. 2018; DESIGN.md section 7).

    from sharpscope.landscape import random_directions, loss_surface, grid
    d1, d2 = random_directions(model, dim=2, seed=0)              # filter-normalised, biases/BN ignored
    surface = loss_surface(model, loss_fn, batches, directions=(d1, d2), coords=(grid(-1, 1, 51), grid(-1, 1, 51)))
    surface.loss[j, i]                                            # L(w0 + xs[i] d1 + ys[j] d2)

Other cuts: :func:`interpolate` (two checkpoints), :func:`plane_through` (three), :func:`trajectory_pca`
(the PCA plane of a training run), :func:`hessian_directions` / :func:`directions_from_vectors`. Directions are
saved and reloaded with :func:`save_directions` / :func:`load_directions`; a raw seeded draw (:func:`gaussian_draw`)
is normalised against any model of the same architecture with :func:`normalize_draw` (comparable cuts).
:func:`run` is the whole ``sharpscope landscape`` analysis (plan, compute, write the files and figures).
"""

from sharpscope.landscape.directions import (
    NORMS,
    Direction,
    difference_direction,
    directions_from_vectors,
    gaussian_draw,
    hessian_directions,
    load_direction,
    load_directions,
    normalize_direction,
    normalize_draw,
    random_direction,
    random_directions,
    save_directions,
    trainable_parameters,
)
from sharpscope.landscape.interpolation import Barrier, PlaneBasis, interpolate, loss_barrier, plane_through
from sharpscope.landscape.surface import (
    ChunkDone,
    Evaluation,
    Surface,
    covering_grid,
    evaluate,
    grid,
    load_surface,
    loss_surface,
)
from sharpscope.landscape.trajectory import TrajectoryPCA, trajectory_pca
from sharpscope.landscape.runner import LandscapeResult, run


__all__ = [
    "Barrier",
    "LandscapeResult",
    "loss_barrier",
    "run",
    "NORMS",
    "ChunkDone",
    "Direction",
    "Evaluation",
    "PlaneBasis",
    "Surface",
    "TrajectoryPCA",
    "difference_direction",
    "covering_grid",
    "directions_from_vectors",
    "evaluate",
    "gaussian_draw",
    "grid",
    "hessian_directions",
    "interpolate",
    "load_direction",
    "load_directions",
    "load_surface",
    "loss_surface",
    "normalize_direction",
    "normalize_draw",
    "plane_through",
    "random_direction",
    "random_directions",
    "save_directions",
    "trainable_parameters",
    "trajectory_pca",
]
