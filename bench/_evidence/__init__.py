"""The parts of ``bench.evidence`` (``python -m bench.evidence``), one idea per module.

``common``: parameters, targets, the fixed signing key, the timed sealing functions.
Phase 1: ``projector`` (the log, the baseline consumer and the projector, each in a child process)
and ``projector_offline`` (where the projector's time goes, without the broker).
Phase 2: ``synthetic`` (vectorised building blocks), ``policy_tables`` (the default policy as lookup
arrays), ``generator`` (one chunk of evidence at a time) and ``store`` (encrypting, sealing, writing).
Phase 3: ``query_baselines`` (the same answers with pyarrow only) and ``queries`` (timing, comparing).
Phase 4: ``verify``. Then ``report`` (markdown and console summary).

The command line and the run from start to end are ``bench/evidence.py``; what the benchmarks share
(broker, child processes, CPU and memory, results files) is in ``bench._harness`` and
``bench._profile``.
"""
