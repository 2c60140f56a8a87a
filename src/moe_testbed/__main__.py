"""``python -m moe_testbed`` (and ``torchrun ... -m moe_testbed train``): the command line."""

from moe_testbed.cli import main

raise SystemExit(main())
