import faulthandler
import sys

from swav_train.cli import main

# A native crash (a signal) then still prints where Python was: the layer, the step.
faulthandler.enable()
sys.exit(main())
