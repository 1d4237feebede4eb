"""The daemon's policy names (flexnpu/daemon/policies.py) are the policies flexnpu.sched.policy
implements, and every front end offers exactly those."""
import argparse

import pytest

from flexnpu import cmd_run, cmd_service
from flexnpu.daemon import main as daemon_main
from flexnpu.daemon.policies import DEFAULT_POLICY, POLICY_NAMES, PolicyName
from flexnpu.daemon.scheduling import make_scheduler
from flexnpu.sched.policy import POLICIES, make_policy


def test_every_name_is_a_policy_class_and_every_class_has_a_name():
    assert set(POLICY_NAMES) == set(POLICIES)
    for name in POLICY_NAMES:
        assert make_policy(name).name == name
    assert DEFAULT_POLICY in POLICY_NAMES and PolicyName(DEFAULT_POLICY).value == DEFAULT_POLICY


def _policy_choices(add_arguments, *sub: str) -> tuple:
    p = argparse.ArgumentParser()
    if sub:
        add_arguments(p)
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                p = a.choices[sub[0]]
    else:
        add_arguments(p)
    [act] = [a for a in p._actions if "--policy" in a.option_strings]
    return tuple(act.choices)


def test_front_ends_offer_exactly_the_registered_policies():
    assert _policy_choices(daemon_main.add_arguments) == POLICY_NAMES
    assert _policy_choices(cmd_run.add_arguments) == POLICY_NAMES
    assert _policy_choices(cmd_service.add_arguments, "install") == POLICY_NAMES


def test_the_scheduler_factory_refuses_unknown_names():
    with pytest.raises(ValueError, match="choose from fifo, priority, flex"):
        make_scheduler("round-robin", daemon=None)  # refused before the daemon is looked at
