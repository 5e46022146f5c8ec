"""Applications that time things: the attention kernels against cuDNN, decoding, serving, a
whole model step, fine-tuning throughput, and the block-size tuning sweeps, with their recorded
results in `results/` and one table of model shapes (`shapes.py`).

Run from the clone, `python -m benchmarks.<name>` (see BENCHMARKS.md). Not an installed
package: nothing in cca_jax, cca_kernels, convert or train imports it.
"""
