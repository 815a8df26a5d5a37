"""Pipeline parallelism: layer split, point-to-point communication and schedules."""
