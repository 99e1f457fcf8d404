"""Benchmarks: serving latency, concurrency and cold start (``bench.serving``) and training throughput
(``bench.training_step``). Not part of the product: the app and the Docker image never import them."""
