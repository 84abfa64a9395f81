import sys

from kernel.train.cli import main

sys.exit(main())
