"""How the suite's modules are shared between its processes (pytest-xdist, `--dist loadfile`).

Modules that load vLLM keep a core computing for most of their time; the others mostly wait on
processes, sockets and timers. Two of the first at once share the two cores and each takes about
twice as long, while two of the second leave the cores idle. So the first process runs the vLLM
modules and the others the rest, each lane longest module first (module_seconds.json, measured by
scripts/module_seconds.py), and a process whose lane is empty takes the shortest module left in
the other lane (the longest would run beside the first process's vLLM modules, and each of two
vLLM modules at once takes about twice as long)."""

from __future__ import annotations

import json
from pathlib import Path

from xdist.scheduler import LoadFileScheduling

# Each module's seconds in a whole run (setup, tests and teardown).
MODULE_SECONDS = json.loads((Path(__file__).parent / "module_seconds.json").read_text())
UNMEASURED_MODULE_SECONDS = 60  # a new module: neither among the longest nor left to the end

# The modules whose tests load vLLM models (servers, workers, the engine in the test process).
VLLM_MODULES = frozenset(f"tests/{name}.py" for name in (
    "test_end_to_end", "test_engine_core", "test_managed_servers", "test_parity", "test_pool",
    "test_shared_servers", "test_vllm_engine"))


# Modules that share the session's demo servers run one after the other, so that the servers stop
# when the last of them is done (conftest.pytest_runtest_teardown).
RUN_TOGETHER = (("tests/test_pool.py", "tests/test_shared_servers.py", "tests/test_parity.py"),)


def longest_first(modules: list[str]) -> list[str]:
    """Longest first, each group of RUN_TOGETHER counted as one module (its modules' seconds summed)."""
    units = [[module for module in group if module in modules] for group in RUN_TOGETHER]
    units = [unit for unit in units if unit]
    grouped = {module for unit in units for module in unit}
    units += [[module] for module in modules if module not in grouped]
    units.sort(key=lambda unit: -sum(MODULE_SECONDS.get(module, UNMEASURED_MODULE_SECONDS) for module in unit))
    return [module for unit in units for module in unit]


class VllmLaneScheduling(LoadFileScheduling):
    """Whole modules, handed out in collection order within each process's lane."""

    def __init__(self, config, log=None) -> None:
        super().__init__(config, log)
        config.option.loadscopereorder = False  # the collection's order, not the modules' numbers of tests

    def _assign_work_unit(self, node) -> None:
        vllm_lane = self.nodes.index(node) == 0
        own = [module for module in self.workqueue if (module in VLLM_MODULES) == vllm_lane]
        module = own[0] if own else next(reversed(self.workqueue))
        self.workqueue.move_to_end(module, last=False)  # the unit the base class hands out next
        super()._assign_work_unit(node)
