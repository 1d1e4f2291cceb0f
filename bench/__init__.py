"""Benchmarks of NexusCore, on a real Kafka broker where they need one.

Three benchmarks, each a command (``make bench``, ``make bench-evidence``) writing
``bench/results/<name>.json`` and ``bench/results/<name>.md``:

* ``python -m bench.pipeline``: throughput, gateway-added latency, memory and CPU of the four stages
  (``bench/pipeline.py``; its phases in ``bench/_pipeline/``);
* ``python -m bench.evidence``: projector throughput, a store of millions of decisions, its queries and
  ``verify`` (``bench/evidence.py``; its phases in ``bench/_evidence/``);
* ``python -m bench.replay``: recorded decisions re-decided per second, per core (``bench/replay.py``).

What they share is written once: ``bench/_harness.py`` (broker, child processes, CPU and memory,
results files, markdown tables, the command line) and ``bench/_profile.py`` (py-spy).
``python -m bench.function_lengths`` keeps every function here under 80 lines.
"""
