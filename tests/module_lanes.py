"""How the suite's modules are shared between its processes (pytest-xdist, `--dist loadfile`).

Modules that load vLLM keep a core computing for most of their time; the others mostly wait on
processes, sockets and timers. Two of the first at once share the two cores and each takes about
twice as long, while two of the second leave the cores idle. So the first process runs the vLLM
modules, the second first runs the two that share the in-process demo engine (SECOND_PROCESS_FIRST:
with the first process's alone they made the longest lane) and then, like the others, the rest;
each lane longest module first (module_seconds.json, measured by scripts/module_seconds.py). A
process whose lane is empty takes the shortest module left in another lane (the longest would run
beside the first process's vLLM modules, and each of two vLLM modules at once takes about twice as
long)."""

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


# The modules that use the demo engine of the test process (conftest.demo_engine, loaded once a
# process): the second process runs them before any other.
SECOND_PROCESS_FIRST = ("tests/test_end_to_end.py", "tests/test_vllm_engine.py")

# Modules that share the session's demo servers run one after the other, so that the servers stop
# when the last of them is done (conftest.pytest_runtest_teardown).
RUN_TOGETHER = (("tests/test_pool.py", "tests/test_shared_servers.py", "tests/test_parity.py"),)


VLLM_LANE, SECOND_LANE, LIGHT_LANE = range(3)


def lane_of(module: str) -> int:
    if module in SECOND_PROCESS_FIRST:
        return SECOND_LANE
    return VLLM_LANE if module in VLLM_MODULES else LIGHT_LANE


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
        process, left = self.nodes.index(node), list(self.workqueue)
        lanes = (VLLM_LANE,) if process == 0 else (SECOND_LANE, LIGHT_LANE) if process == 1 else (LIGHT_LANE,)
        own = [module for lane in lanes for module in left if lane_of(module) == lane]
        module = own[0] if own else left[-1]
        self.workqueue.move_to_end(module, last=False)  # the unit the base class hands out next
        super()._assign_work_unit(node)
