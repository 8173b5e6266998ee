"""sharpscope: train with SGD or SAM, then measure how sharp or flat the minimum is.

The library is organised so data flows one way (DESIGN.md section 2)::

    data -> models -> optim (SAM) -> train -> checkpoints
         -> hessian / sharpness / landscape -> results -> plots -> cli

Import the submodules you need (``sharpscope.data``, ``sharpscope.models``, ``sharpscope.optim``, ...);
this top-level module stays light so ``sharpscope --help`` is instant.
"""

__version__ = "0.1.0"
