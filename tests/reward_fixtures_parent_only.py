"""A reward module that imports only in the process that set DORA_TEST_PARENT_PID: its workers
cannot start (simulates a reward whose imports fail inside worker processes)."""

import os

if os.environ.get("DORA_TEST_PARENT_PID") != str(os.getpid()):
    raise ImportError("reward_fixtures_parent_only is importable only in the test process")


def constant(response, answer, meta):
    return 1.0
