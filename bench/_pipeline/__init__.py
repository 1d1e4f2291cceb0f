"""The parts of ``bench.pipeline`` (``python -m bench.pipeline``), one idea per module.

In the order a run uses them: ``params`` (what a run is asked for; targets, waits), ``topics``
(publishing requests, counting what the stages wrote), ``baseline`` (phase 1: plain aiokafka),
``stages`` (the four stages as processes, waiting for the evidence), ``throughput`` (phase 2),
``latency`` (phase 3), ``report`` (markdown and console summary). The command line and the run from
start to end are ``bench/pipeline.py``; what the benchmarks share (broker, child processes, CPU and
memory, results files) is in ``bench._harness`` and ``bench._profile``.
"""
