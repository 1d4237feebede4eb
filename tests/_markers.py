"""Which tests are `slow` (skipped by `make check`), decided in one place.

The rule: a test that starts a daemon, a whole program or a compiler is slow; the fast subset is
everything that runs in-process (the wire table, the ring's C core over one mapping, the cost
model, the policies in virtual time, the hook's logic over the loopback client). A daemon
fixture anywhere in a test's fixture closure marks it; the lists below name the rest.
Tests that assert wall-clock behaviour carry `@pytest.mark.timing` themselves.
"""

from __future__ import annotations

import pytest

# fixtures that start a daemon process (directly or through start_daemon)
DAEMON_FIXTURES = frozenset(
    {"start_daemon", "daemon", "client", "npu", "two_npus", "acl_daemon", "acl", "two_daemons"}
)

# whole modules: programs in subprocesses, C builds, stress runs
SLOW_MODULES = frozenset(
    {
        "test_run",
        "test_hook_install",
        "test_hook_models",
        "test_serve_realtime",
        "test_calibrate",
        "test_acl_program",
        "test_ring_tsan",
        "test_ring_stress",
        "test_ring_liveness",
        "test_ops_notify",
        "test_ops_logging",
        "test_native_ops",
    }
)

# single tests over a few seconds that need no daemon
SLOW_TESTS = frozenset(
    {
        "test_sim_serving.py::test_bench_serve_json_shape",
        "test_sim_serving.py::test_flex_keeps_decode_near_its_tpot_budget_and_gives_prefill_the_rest",
        "test_sim_serving.py::test_flex_throughput_at_least_static_disagg_on_balanced_mix",
        "test_sim_serving.py::test_more_load_is_never_faster",
        "test_ring_basic.py::test_arena_views_zero_copy",
        "test_capacity.py::test_flex_sustains_more_prefill_heavy_load_than_the_best_static_split",
        "test_capacity.py::test_no_system_beats_the_floor_under_load",
    }
)


def is_slow(item: pytest.Item) -> bool:
    module = item.path.stem
    name = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
    return (
        module in SLOW_MODULES
        or name in SLOW_TESTS
        or not DAEMON_FIXTURES.isdisjoint(getattr(item, "fixturenames", ()))
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if is_slow(item):
            item.add_marker(pytest.mark.slow)
