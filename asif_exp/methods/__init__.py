"""Methods: given the embedded problem, a score matrix per cell of a hyper-parameter grid."""
