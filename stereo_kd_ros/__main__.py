"""`python -m stereo_kd_ros` runs the node, like the `stereo_kd_node` console script."""

import sys

from stereo_kd_ros.entry import node_main

sys.exit(node_main())
