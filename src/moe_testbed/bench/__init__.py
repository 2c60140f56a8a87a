"""Performance benchmarks: ``moe-testbed bench`` (docs/benchmarks.md).

timing.py   interleaved repeats, per-pair ratios, quantiles
memory.py   peak tensor memory of one call (CUDA allocator stats; CPU via profiler events)
guard.py    float64 references; a variant that does not match is not timed
group.py    guard + time + memory for one set of interleaved variants
layer.py    the MoE layer vs the dense floor vs HF's Mixtral block
hf.py       building HF's Mixtral block with our weights
step.py     whole training steps: MoE vs dense, balancing methods, routing statistics
run.py      options and the sections in order
report.py   rich / Markdown tables, JSON
cli.py      the ``bench`` command
"""

SECTIONS = ("layer", "step", "balance", "stats")  # in the order they run
