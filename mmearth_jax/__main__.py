import sys

from mmearth_jax.cli import main

sys.exit(main())
