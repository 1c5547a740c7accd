import sys

from mlcd_train.cli import main

sys.exit(main())
