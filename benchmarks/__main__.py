"""``python -m benchmarks <command> ...``: run one benchmark's CLI.

* ``speed``   - speed and memory (``benchmarks.speed``; ``--gpu-scale`` is the CUDA run of ``gpu.sh``);
* ``utility`` - the real-data utility study (``benchmarks.utility``, imported only when asked for);
* ``init_rows`` - cold start with zero vs null label rows (``benchmarks.init_rows``);
* ``paper_shapes`` - every stage of the paper's recipes at DiT-XL/2 shapes on CPU, one step each, with
  peak memory per stage (``benchmarks.paper_shapes``);
* ``rl_modes`` - DPOK vs windowed DPOK vs DRaFT-K on the toy demo (``benchmarks.rl_modes``).
* ``fast_sampling`` - images/s at matched quality: fast solvers vs ``DiTPipeline``
  (``benchmarks.fast_sampling``);
* ``selection_scope`` - head- vs full-scope lookahead selection picks (``benchmarks.selection_scope``);
* ``selection_variants`` - selection variants against wrong labels (``benchmarks.selection_variants``);
* ``prior_recipe`` - what makes a small from-scratch pixel DiT sample toy persons: schedule, min-SNR,
  x0 clipping, samplers, training steps, cold starts from the prior (``benchmarks.prior_recipe``);
* ``parallel_jobs`` - a study's wall time as one process vs as parallel stages (``benchmarks.parallel_jobs``).
* ``novelty`` - how far synthetic images sit from the generator's training images, against new real
  images (``benchmarks.novelty``).
* ``oracle_split`` - held-back real images of an identity-folder target as a synthetic set (the oracle
  row, ``benchmarks.oracle_split``).
* ``lighting_spread`` - whether synthetic sets vary an identity's lighting as its test images do
  (``benchmarks.lighting_spread``).
* ``coverage`` - whether a synthetic set covers the test images its identities' training images do not
  (1-NN identification gain; ``benchmarks.coverage``).
* ``cold_trajectory`` - coverage of a cold start's samples at steps along it, the gain split into test
  images gained and taken, with a filter on the training images (``benchmarks.cold_trajectory``).
* ``roundtrip`` - a set of real images sent through a generator and back (SDEdit under each image's own
  identity, ``benchmarks.roundtrip``): its content with the generator's rendering.
* ``lowfreq_control`` - the non-generative control of a set generated from images: the training image with
  each start image's low frequencies (``benchmarks.lowfreq_control``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

COMMANDS = {
    "speed": "benchmarks.speed:main",
    "utility": "benchmarks.utility:main",
    "init_rows": "benchmarks.init_rows:main",
    "paper_shapes": "benchmarks.paper_shapes:main",
    "rl_modes": "benchmarks.rl_modes:main",
    "fast_sampling": "benchmarks.fast_sampling:main",
    "selection_scope": "benchmarks.selection_scope:main",
    "selection_variants": "benchmarks.selection_variants:main",
    "verdict": "benchmarks.verdict:main",
    "prior_recipe": "benchmarks.prior_recipe:main",
    "parallel_jobs": "benchmarks.parallel_jobs:main",
    "lighting_spread": "benchmarks.lighting_spread:main",
    "novelty": "benchmarks.novelty:main",
    "oracle_split": "benchmarks.oracle_split:main",
    "lowfreq_control": "benchmarks.lowfreq_control:main",
    "roundtrip": "benchmarks.roundtrip:main",
    "coverage": "benchmarks.coverage:main",
    "cold_trajectory": "benchmarks.cold_trajectory:main",
    "train_fit": "benchmarks.train_fit:main",
}


def _load(target: str) -> Callable[[list[str]], int] | None:
    """The command's ``main``, or None when its module does not exist (yet)."""
    module_name, func = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:  # a missing dependency inside the module: a real error
            raise
        return None
    return getattr(module, func)


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m benchmarks <command> [args]``; returns the command's exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m benchmarks {{{','.join(COMMANDS)}}} [args]  (--help after a command)")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unknown benchmark {command!r}; expected one of {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    entry = _load(COMMANDS[command])
    if entry is None:
        print(f"{COMMANDS[command].split(':')[0]} is not part of this checkout", file=sys.stderr)
        return 2
    return int(entry(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
