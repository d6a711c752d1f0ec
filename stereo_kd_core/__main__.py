import sys

from stereo_kd_core.cli import main

sys.exit(main())
