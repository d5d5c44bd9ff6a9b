"""Tasks: metrics from a method's score matrix and the benchmark's ground truth."""
