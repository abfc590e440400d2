"""The ``gradproj demo`` application (``gradproj.demo``): GRPO on a small model made here.

Not part of the library's core nor of its integrations: an application built on them. It holds a
complete plain-PyTorch GRPO loop (`gradproj.demo.grpo_loop`, on
`gradproj.integrations.torch`), the tasks and the small policy it trains
(`gradproj.demo.tasks`, `gradproj.demo.adder`), rollouts (`gradproj.demo.rollout`),
the policies (`gradproj.demo.policies`), held-out evaluation (`gradproj.demo.evaluation`),
parallel resumable runs (`gradproj.demo.runs`), the verdict rule (`gradproj.demo.verdicts`), the
report with its plots (`gradproj.demo.report`, `gradproj.demo.app`) and the command line
(`gradproj.demo.cli`). The benchmarks' reproductions run on the same loop, runner and rule.
"""
