"""stereo_kd_ros: the ROS 2 node around stereo_kd_core's StereoEstimator (see DESIGN.md)."""
