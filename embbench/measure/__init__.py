"""Measuring a trained cell and a scheme: latency, memory, post-training quantisation, collision statistics, sizes
(`embbench size`), and the environment a result was measured in."""
