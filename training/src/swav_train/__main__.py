import sys

from swav_train.cli import main

sys.exit(main())
