"""Speed, memory and task-utility benchmarks (JSON + markdown); see README."""
