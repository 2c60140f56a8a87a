"""Same as ``moe-testbed bench``: ``python benchmarks/run_bench.py [--quick] [--only layer] [--out FILE]``.

The benchmark lives in ``moe_testbed.bench`` so that it ships with the package;
this file is a convenience for a checkout without the console script on PATH.
"""

import os
import sys

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # before torch loads: the memory profiler is chatty

from moe_testbed.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
