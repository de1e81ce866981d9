"""Speed and memory benchmarks (not tests): run each as `python -m bench.NAME --help`.

docs/PERFORMANCE.md says what each one measures and gives the exact commands.
"""
