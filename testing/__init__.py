"""Test support shipped with gradproj (``gradproj.testing``), not used by the library itself.

* `gradproj.testing.verl_cpu` -- verl's real FSDP actor update on the CPU (a CPU platform
  verl 0.9 lacks, a one-process gloo group): the verl tests and the CPU smoke run use it.
"""
