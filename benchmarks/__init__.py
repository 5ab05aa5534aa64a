"""commitpoint's benchmark suite: one module per question, run together by ``python -m benchmarks``.

Every module ``benchmarks/<name>.py`` has ``main(argv) -> int``, accepts ``--quick`` (small sizes,
few repeats) and writes its rows to ``<results dir>/<name>.json``; the runner
(:mod:`benchmarks.__main__`) renders them into ``docs/benchmarks.md`` and plots in ``docs/img``.
See ``benchmarks/README.md``.
"""
