"""Each test module's seconds in a run, for the suite's ordering (tests/module_seconds.json):

    scripts/test.sh --junitxml=run.xml && python scripts/module_seconds.py run.xml > tests/module_seconds.json

A test case's time in the JUnit report includes its setup and teardown, so module fixtures count."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ElementTree
from collections import defaultdict


def module_seconds(report_path: str) -> dict[str, float]:
    seconds: dict[str, float] = defaultdict(float)
    for case in ElementTree.parse(report_path).iter("testcase"):
        module = case.get("classname", "").split(".")
        while module and not module[-1].startswith("test_"):
            module.pop()  # a test class's name follows its module's
        seconds["/".join(module) + ".py"] += float(case.get("time", 0))
    return {module: round(total, 1) for module, total in sorted(seconds.items(), key=lambda item: -item[1])}


if __name__ == "__main__":
    json.dump(module_seconds(sys.argv[1]), sys.stdout, indent=1)
    sys.stdout.write("\n")
