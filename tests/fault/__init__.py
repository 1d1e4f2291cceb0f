"""Fault injection: the whole pipeline under load while its processes are killed (slow; `make fault`)."""
