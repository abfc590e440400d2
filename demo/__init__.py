"""The ``gradproj demo`` application (``gradproj.demo``): GRPO on a small model made here.

Not part of the library's core nor of its integrations: an application built on them. It holds a
complete plain-PyTorch GRPO loop (:mod:`gradproj.demo.grpo_loop`, on
:mod:`gradproj.integrations.torch`), the tasks and the small policy it trains
(:mod:`gradproj.demo.tasks`, :mod:`gradproj.demo.adder`), rollouts (:mod:`gradproj.demo.rollout`),
the report with its plots (:mod:`gradproj.demo.app`) and the command line
(:mod:`gradproj.demo.cli`). The benchmarks' reproductions run on the same loop.
"""
